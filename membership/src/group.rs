//! The group key: one MLS (RFC 9420, TreeKEM) group of the replicas, with the ordering layer as
//! MLS's delivery service, and sealing of confidential payloads under a key derived from it.
//!
//! # Contract
//! - Each member's MLS credential is a basic credential whose identity is its [`NodeId`], and
//!   its MLS signature key is the Ed25519 key of its certificate: the same key signs TLS
//!   handshakes and MLS messages. A key package is accepted for an `AddNode` only if both match
//!   the certificate in the command ([`GroupMember::check_key_package`]).
//! - Commits take effect only through [`GroupMember::apply_commit_checked`] (or
//!   [`GroupMember::apply_commit`] without a membership), called with the commits in the order
//!   the ordering layer delivers them. Every member applies the same commits in the same order;
//!   a commit made for another epoch (stale, replayed, or the loser of two competing commits) is
//!   refused by every member alike, and so is one from a non-member or with a bad signature. A
//!   member's own commit is merged only when it comes back in that order.
//! - The commit policy ([`GroupMember::apply_commit_checked`], [`CommitPolicy`]), judged from
//!   the ordered state alone, so that every correct member decides alike: the committer is a
//!   current replica; a commit adds only current replicas that asked to be added, with exactly
//!   the key package they ordered (bound to the certificate), and that are not in the group;
//!   it removes only members that are no longer replicas or that it adds again in the same
//!   commit (a member whose key was lost and that asked again, [`GroupMember::propose_readd`]),
//!   keeps the committer's credential and key, and carries no other proposal (pre-shared keys,
//!   re-init, external init, group context extensions, updates by reference, custom).
//! - A merged commit is *unsettled* until the ordering layer says whether the group took it
//!   ([`GroupMember::settle`]): the member keeps its state from before (in memory), and goes
//!   back to it if the commit is voided. This is what lets the replicas' replicated state undo
//!   a commit that some correct members could not apply (MLS cannot tell that from public data:
//!   path secrets are encrypted to each member, and the confirmation tag needs the epoch's
//!   secrets).
//! - After each epoch change the payload key is `BLAKE3-derive_key(PAYLOAD_KEY_CONTEXT,
//!   MLS-Exporter(EXPORTER_LABEL, "", 32))`; payloads are sealed with AES-256-GCM-SIV and a
//!   random nonce. A sealed payload names its epoch and sender; the AAD binds the domain tag,
//!   epoch, sender and a caller-given context (e.g. view and sequence number). The keys of the
//!   last `keep_epochs` epochs stay usable for in-flight messages; older ones are erased
//!   (zeroized), unless the caller pinned them ([`GroupMember::pin_keys`]: a journal still
//!   holds data sealed in them), and never more than [`MAX_KEPT_EPOCHS`]. Sealing gives confidentiality to the group; the sender's authenticity comes
//!   from the authenticated channel and the consensus signatures, not from the shared key.
//! - [`RotationPolicy`] says when to commit an Update (by age of the epoch or by the number of
//!   payloads sealed in it) for forward secrecy and post-compromise security.
//! - With a state file, the member's MLS state (the openmls storage) and its key ring are
//!   written atomically (mode 0600) after every change, so a restarted member is still a member.
//!
//! - [`PayloadKeys::seal_shared`] seals deterministically, for values every member computes
//!   alike and compares by digest (a checkpoint's snapshot): the sender is [`GROUP_SENDER`] and
//!   the nonce is derived from the AAD, so equal inputs give equal bytes at every member.
//!   AES-GCM-SIV is built for this (RFC 8452, nonce-misuse resistance): a repeated nonce reveals
//!   only that two sealed values are equal, which a shared digest reveals anyway.
//!
//! - [`PayloadKeys::client_key`] derives, per epoch and client, a key the client seals its own
//!   confidential payloads with ([`ClientSealingKey`]): `BLAKE3-derive_key(CLIENT_KEY_CONTEXT,
//!   payload key | client id)`. It is one-way, so a client learns neither the epoch's key nor
//!   another client's; what it seals names it as sender and opens only with
//!   [`PayloadKeys::open_from_client`] for that client.
//!
//! Sealed format: `version=1 u8 | epoch u64 | sender [32] | nonce [12] | ciphertext+tag`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Ciphersuite, CredentialWithKey, GroupId, KeyPackage, KeyPackageIn,
    LeafNodeIndex, LeafNodeParameters, MlsGroup, MlsGroupCreateConfig, MlsGroupJoinConfig,
    MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent, Proposal as MlsProposal,
    ProtocolVersion, StagedWelcome,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use openmls_traits::types::SignatureScheme;
use rustls::pki_types::CertificateDer;
use securesmart_transport::{Identity, NodeId, ed25519_public_key};
use zeroize::{Zeroize, Zeroizing};

use crate::epoch::Membership;

use crate::store::{self, Faults};
use securesmart_base::wire::{Reader, WireError, Writer};

/// The MLS ciphersuite of the group.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// MLS exporter label of the payload key.
pub const EXPORTER_LABEL: &str = securesmart_base::tags::membership::PAYLOAD_EXPORTER_LABEL;
/// BLAKE3 `derive_key` context of the payload key (versioned).
pub const PAYLOAD_KEY_CONTEXT: &str = securesmart_base::tags::membership::PAYLOAD_KEY;
/// Domain tag at the start of every sealed payload's AAD.
pub const SEALED_AAD_TAG: &[u8] = securesmart_base::tags::membership::SEALED_PAYLOAD.as_bytes();
/// BLAKE3 `derive_key` context of the nonce of [`PayloadKeys::seal_shared`].
pub const SHARED_NONCE_CONTEXT: &str = securesmart_base::tags::membership::SHARED_SEAL_NONCE;
/// The sender named by [`PayloadKeys::seal_shared`]: the group, not one member.
pub const GROUP_SENDER: NodeId = NodeId::from_bytes([0; 32]);
/// Most epoch keys a member keeps, pinned or not.
pub const MAX_KEPT_EPOCHS: usize = 64;
/// Sealed-payload format version.
const SEALED_VERSION: u8 = 1;
/// Bytes before the ciphertext.
const SEALED_HEADER: usize = 1 + 8 + 32 + 12;
/// Largest MLS message accepted by [`GroupMember::apply_commit`] and friends.
pub const MAX_MLS_MESSAGE_BYTES: usize = 1024 * 1024;
/// State-file format version (2: the digest of the commit that made the current epoch).
const STATE_VERSION: u8 = 2;
/// BLAKE3 `derive_key` context of [`commit_digest`].
pub const COMMIT_DIGEST_CONTEXT: &str = securesmart_base::tags::membership::COMMIT_DIGEST;
/// The digest that stands for the epoch a group was created in (no commit made it).
pub const CREATION_DIGEST: [u8; 32] = [0; 32];
/// BLAKE3 `derive_key` context of [`key_package_digest`].
pub const KEY_PACKAGE_DIGEST_CONTEXT: &str = securesmart_base::tags::membership::KEY_PACKAGE_DIGEST;
/// A key package is used only if its lifetime began at least this long before the committer's
/// clock and ends at least [`KEY_PACKAGE_MARGIN`] after it, so that members whose clocks are
/// off by less judge it alike (openmls checks the lifetime against each member's own clock;
/// its key packages start an hour back).
pub const KEY_PACKAGE_MARGIN_BEFORE: Duration = Duration::from_secs(30 * 60);
/// See [`KEY_PACKAGE_MARGIN_BEFORE`]: how long a key package must stay valid after now.
pub const KEY_PACKAGE_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// The digest of an ordered key package (its TLS encoding), as the commit policy names the
/// key package each replica asks to be added with.
pub fn key_package_digest(key_package: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new_derive_key(KEY_PACKAGE_DIGEST_CONTEXT)
        .update(key_package)
        .finalize()
        .as_bytes()
}

/// What a commit may do, from the ordered (replicated) state alone, so that every correct
/// member judges it alike (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct CommitPolicy<'a> {
    /// The membership at the commit's log position.
    pub membership: &'a Membership,
    /// The replicas that asked to be added (they ordered a key package and acknowledged no
    /// key since), with the digest of that key package ([`key_package_digest`]): an Add (or a
    /// re-add) must use exactly it.
    pub joining: &'a BTreeMap<NodeId, [u8; 32]>,
}
/// Largest state file read back.
const MAX_STATE_BYTES: usize = 256 * 1024 * 1024;

/// Errors of the group layer. Those caused by a peer's input are distinct from local ones.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The identity's key is not an Ed25519 key this layer can use.
    #[error("the node key is not a usable Ed25519 key")]
    BadNodeKey,
    /// An MLS operation failed locally.
    #[error("MLS: {0}")]
    Mls(String),
    /// An MLS message (commit, welcome, key package) is malformed or does not verify.
    #[error("invalid MLS message: {0}")]
    InvalidMessage(String),
    /// A commit was refused: made for another epoch, by a non-member, or not verifying.
    #[error("commit refused: {0}")]
    CommitRefused(String),
    /// A key package's credential or key does not match the certificate.
    #[error("key package does not match the certificate: {0}")]
    KeyPackageMismatch(String),
    /// The operation needs a group and this member has none (not joined, or removed).
    #[error("not a member of the group")]
    NotMember,
    /// No member with that node id.
    #[error("no member {0}")]
    UnknownMember(NodeId),
    /// A sealed payload names an epoch whose key this member does not hold.
    #[error("no key for epoch {0}")]
    UnknownEpoch(u64),
    /// A sealed payload is malformed.
    #[error("malformed sealed payload")]
    Malformed,
    /// A sealed payload does not authenticate (tampered ciphertext, nonce, epoch, sender or
    /// context).
    #[error("sealed payload does not authenticate")]
    Tampered,
    /// The state file could not be written or read.
    #[error("state: {0}")]
    State(String),
}

fn mls_err(e: impl std::fmt::Debug) -> GroupError {
    GroupError::Mls(format!("{e:?}"))
}

/// When to rotate the group key with an Update commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Rotate once the epoch is this old.
    pub max_age: Duration,
    /// Rotate once this many payloads were sealed in the epoch.
    pub max_sealed: u64,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(600),
            max_sealed: 1_000_000,
        }
    }
}

/// Configuration of a member.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Epoch keys kept for in-flight payloads, the current one included (at least 1).
    pub keep_epochs: usize,
    /// Key rotation.
    pub rotation: RotationPolicy,
    /// Where the member's state is persisted (none: memory only).
    pub state_file: Option<PathBuf>,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            keep_epochs: 3,
            rotation: RotationPolicy::default(),
            state_file: None,
        }
    }
}

/// The openmls provider of one member: crypto from RustCrypto, storage in memory that we
/// persist ourselves.
#[derive(Default)]
struct Provider {
    crypto: RustCrypto,
    storage: MemoryStorage,
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &MemoryStorage {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

/// A payload opened by [`GroupMember::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The epoch it was sealed in.
    pub epoch: u64,
    /// The sender it names.
    pub sender: NodeId,
    /// The plaintext.
    pub plaintext: Vec<u8>,
}

/// A member's payload keys: the keys of its last `keep_epochs` epochs and which one is
/// current. [`GroupMember::payload_keys`] hands out handles that share them, so that a node
/// can seal and open payloads in other tasks while the member moves through epochs.
#[derive(Clone)]
pub struct PayloadKeys {
    id: NodeId,
    inner: Arc<RwLock<KeyRing>>,
}

#[derive(Default)]
struct KeyRing {
    current: Option<u64>,
    keys: BTreeMap<u64, Zeroizing<[u8; 32]>>,
    sealed_in_epoch: u64,
    /// Keys of this epoch and later are kept beyond `keep` (see [`GroupMember::pin_keys`]).
    pinned: Option<u64>,
}

/// A copy of a [`KeyRing`] (an unsettled commit's undo; zeroized when dropped).
#[derive(Default)]
struct KeyRingSnapshot {
    current: Option<u64>,
    keys: BTreeMap<u64, Zeroizing<[u8; 32]>>,
    sealed_in_epoch: u64,
}

impl KeyRing {
    /// Erases the oldest keys beyond `keep`, except pinned ones (up to [`MAX_KEPT_EPOCHS`]).
    /// Whether any was erased.
    fn prune(&mut self, keep: usize) -> bool {
        let mut erased = false;
        while self.keys.len() > keep {
            let Some(oldest) = self.keys.keys().next().copied() else {
                break;
            };
            if self.keys.len() <= MAX_KEPT_EPOCHS && self.pinned.is_some_and(|p| oldest >= p) {
                break;
            }
            // Dropping a Zeroizing key erases it.
            self.keys.pop_first();
            erased = true;
        }
        erased
    }
}

impl std::fmt::Debug for PayloadKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadKeys")
            .field("current", &self.current())
            .field("epochs", &self.epochs())
            .finish_non_exhaustive()
    }
}

fn key_lock<T>(_: T) -> GroupError {
    GroupError::State("payload key lock".into())
}

impl PayloadKeys {
    fn new(id: NodeId) -> Self {
        Self {
            id,
            inner: Arc::new(RwLock::new(KeyRing::default())),
        }
    }

    /// The current epoch, if this member is in a group.
    pub fn current(&self) -> Option<u64> {
        self.inner.read().ok().and_then(|k| k.current)
    }

    /// Epochs whose keys this member holds.
    pub fn epochs(&self) -> Vec<u64> {
        self.inner
            .read()
            .map(|k| k.keys.keys().copied().collect())
            .unwrap_or_default()
    }

    fn sealed_in_epoch(&self) -> u64 {
        self.inner.read().map(|k| k.sealed_in_epoch).unwrap_or(0)
    }

    fn entered(&self, epoch: u64, key: Zeroizing<[u8; 32]>, keep: usize) -> Result<(), GroupError> {
        let mut k = self.inner.write().map_err(key_lock)?;
        k.keys.insert(epoch, key);
        k.prune(keep);
        k.current = Some(epoch);
        k.sealed_in_epoch = 0;
        Ok(())
    }

    /// Keeps the keys of `from` and later epochs (see [`GroupMember::pin_keys`]); whether
    /// older keys were erased.
    fn pin(&self, from: u64, keep: usize) -> Result<bool, GroupError> {
        let mut k = self.inner.write().map_err(key_lock)?;
        k.pinned = Some(from);
        Ok(k.prune(keep))
    }

    fn snapshot(&self) -> Result<KeyRingSnapshot, GroupError> {
        let k = self.inner.read().map_err(key_lock)?;
        Ok(KeyRingSnapshot {
            current: k.current,
            keys: k.keys.clone(),
            sealed_in_epoch: k.sealed_in_epoch,
        })
    }

    fn put_back(&self, snapshot: KeyRingSnapshot) -> Result<(), GroupError> {
        let mut k = self.inner.write().map_err(key_lock)?;
        k.current = snapshot.current;
        k.keys = snapshot.keys;
        k.sealed_in_epoch = snapshot.sealed_in_epoch;
        Ok(())
    }

    fn left(&self) -> Result<(), GroupError> {
        self.inner.write().map_err(key_lock)?.current = None;
        Ok(())
    }

    fn restored(
        &self,
        keys: BTreeMap<u64, Zeroizing<[u8; 32]>>,
        current: Option<u64>,
    ) -> Result<(), GroupError> {
        let mut k = self.inner.write().map_err(key_lock)?;
        k.keys = keys;
        k.current = current;
        k.sealed_in_epoch = 0;
        Ok(())
    }

    fn encode(&self, w: &mut Writer) -> Result<(), GroupError> {
        let k = self.inner.read().map_err(key_lock)?;
        w.raw(&(k.keys.len() as u32).to_be_bytes());
        for (epoch, key) in &k.keys {
            w.raw(&epoch.to_be_bytes()).raw(key.as_ref());
        }
        Ok(())
    }

    /// Seals `plaintext` under the current epoch's key, binding `context`.
    ///
    /// # Errors
    /// [`GroupError::NotMember`] without a group.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, GroupError> {
        let epoch = self.current().ok_or(GroupError::NotMember)?;
        self.seal_in(epoch, context, plaintext)
    }

    /// Seals `plaintext` under the key of `epoch` (the current one or one still kept),
    /// binding `context`.
    ///
    /// # Errors
    /// [`GroupError::UnknownEpoch`] if this member does not hold that epoch's key.
    pub fn seal_in(
        &self,
        epoch: u64,
        context: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, GroupError> {
        let sealed = seal_with(
            &self.cipher(epoch)?,
            epoch,
            self.id,
            |_| rand::random(),
            context,
            plaintext,
        )?;
        self.inner.write().map_err(key_lock)?.sealed_in_epoch += 1;
        Ok(sealed)
    }

    /// Seals `plaintext` under the key of `epoch` deterministically: every member holding
    /// that key gets the same bytes for the same `context` and `plaintext` (the sender is
    /// [`GROUP_SENDER`], the nonce derived from the AAD; see the module doc). For values the
    /// members compare by digest, such as a checkpoint's snapshot; `context` must name the
    /// value (e.g. its sequence number). [`PayloadKeys::open`] opens it.
    ///
    /// # Errors
    /// [`GroupError::UnknownEpoch`] if this member does not hold that epoch's key.
    pub fn seal_shared(
        &self,
        epoch: u64,
        context: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, GroupError> {
        let derived_nonce = |aad: &[u8]| {
            let derived = blake3::derive_key(SHARED_NONCE_CONTEXT, aad);
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&derived[..12]);
            nonce
        };
        seal_with(
            &self.cipher(epoch)?,
            epoch,
            GROUP_SENDER,
            derived_nonce,
            context,
            plaintext,
        )
    }

    /// The cipher of `epoch`'s key.
    fn cipher(&self, epoch: u64) -> Result<Aes256GcmSiv, GroupError> {
        let k = self.inner.read().map_err(key_lock)?;
        let key = k.keys.get(&epoch).ok_or(GroupError::UnknownEpoch(epoch))?;
        Aes256GcmSiv::new_from_slice(key.as_ref()).map_err(mls_err)
    }

    /// Opens a sealed payload with the key of the epoch it names, checking `context`.
    ///
    /// # Errors
    /// [`GroupError::Malformed`], [`GroupError::UnknownEpoch`] (e.g. a removed member and a new
    /// epoch, or an epoch older than the window), [`GroupError::Tampered`].
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Opened, GroupError> {
        let parts = parse_sealed(sealed)?;
        open_with(&self.cipher(parts.epoch)?, parts, context)
    }

    /// The key `client` seals its own confidential payloads with in `epoch` (see
    /// [`ClientSealingKey`]): `BLAKE3-derive_key(CLIENT_KEY_CONTEXT, epoch key | client id)`,
    /// so that it tells the client nothing about the epoch's key or another client's key.
    ///
    /// # Errors
    /// [`GroupError::UnknownEpoch`] if this member does not hold that epoch's key.
    pub fn client_key(&self, epoch: u64, client: &NodeId) -> Result<ClientSealingKey, GroupError> {
        let k = self.inner.read().map_err(key_lock)?;
        let key = k.keys.get(&epoch).ok_or(GroupError::UnknownEpoch(epoch))?;
        let mut h = blake3::Hasher::new_derive_key(CLIENT_KEY_CONTEXT);
        h.update(key.as_ref()).update(client.as_bytes());
        let derived = ClientSealingKey::from_bytes(epoch, *client, *h.finalize().as_bytes());
        // The hasher's buffer holds the epoch key.
        h.zeroize();
        Ok(derived)
    }

    /// Opens a payload `client` sealed with its [`ClientSealingKey`] of the epoch the payload
    /// names, checking `context`.
    ///
    /// # Errors
    /// [`GroupError::Malformed`], [`GroupError::UnknownEpoch`], [`GroupError::Tampered`] (also
    /// when the payload names another sender than `client`).
    pub fn open_from_client(
        &self,
        sealed: &[u8],
        client: &NodeId,
        context: &[u8],
    ) -> Result<Opened, GroupError> {
        let parts = parse_sealed(sealed)?;
        if parts.sender != *client {
            return Err(GroupError::Tampered);
        }
        self.client_key(parts.epoch, client)?
            .open_parts(parts, context)
    }
}

/// BLAKE3 `derive_key` context of a client's sealing key ([`PayloadKeys::client_key`]).
pub const CLIENT_KEY_CONTEXT: &str = securesmart_base::tags::membership::CLIENT_SEALING_KEY;

/// A client's key for sealing its own confidential payloads in one group epoch: the replicas
/// derive it from the epoch's key ([`PayloadKeys::client_key`]) and hand it to the client over
/// its mutual-TLS link, so that the client seals and no replica has to. Payloads it seals name
/// the client as sender and open with [`PayloadKeys::open_from_client`] (same sealed format,
/// AAD and cipher as the group's own). Zeroized when dropped; its `Debug` hides the key; `==`
/// compares in constant time. What clients seal is under their own keys, so it does not count
/// toward [`RotationPolicy`]'s payloads sealed in an epoch.
#[derive(Clone)]
pub struct ClientSealingKey {
    epoch: u64,
    client: NodeId,
    key: Zeroizing<[u8; 32]>,
}

impl ClientSealingKey {
    /// The key `key` of `client` in `epoch` (as a replica handed it out).
    pub fn from_bytes(epoch: u64, client: NodeId, key: [u8; 32]) -> Self {
        Self {
            epoch,
            client,
            key: Zeroizing::new(key),
        }
    }

    /// The group epoch it belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The client it belongs to.
    pub fn client(&self) -> NodeId {
        self.client
    }

    /// The secret key bytes (to send to its client; never log them).
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.key
    }

    fn cipher(&self) -> Result<Aes256GcmSiv, GroupError> {
        Aes256GcmSiv::new_from_slice(self.key.as_ref()).map_err(mls_err)
    }

    /// Seals `plaintext` in the client's name, binding `context`, with a random nonce.
    ///
    /// # Errors
    /// [`GroupError::Mls`] if the cipher fails.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, GroupError> {
        seal_with(
            &self.cipher()?,
            self.epoch,
            self.client,
            |_| rand::random(),
            context,
            plaintext,
        )
    }

    /// Opens what this key sealed, checking `context`.
    ///
    /// # Errors
    /// [`GroupError::Malformed`], [`GroupError::UnknownEpoch`] for another epoch,
    /// [`GroupError::Tampered`] (also for another sender).
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Opened, GroupError> {
        let parts = parse_sealed(sealed)?;
        if parts.epoch != self.epoch {
            return Err(GroupError::UnknownEpoch(parts.epoch));
        }
        if parts.sender != self.client {
            return Err(GroupError::Tampered);
        }
        self.open_parts(parts, context)
    }

    fn open_parts(&self, parts: Sealed<'_>, context: &[u8]) -> Result<Opened, GroupError> {
        open_with(&self.cipher()?, parts, context)
    }
}

impl PartialEq for ClientSealingKey {
    fn eq(&self, other: &Self) -> bool {
        // blake3::Hash compares in constant time.
        self.epoch == other.epoch
            && self.client == other.client
            && blake3::Hash::from_bytes(*self.key) == blake3::Hash::from_bytes(*other.key)
    }
}

impl Eq for ClientSealingKey {}

impl std::fmt::Debug for ClientSealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSealingKey")
            .field("epoch", &self.epoch)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// Seals `plaintext` with `cipher` (the key of `epoch`) in the name of `sender`, with the nonce
/// `nonce` makes from the AAD.
fn seal_with(
    cipher: &Aes256GcmSiv,
    epoch: u64,
    sender: NodeId,
    nonce: impl FnOnce(&[u8]) -> [u8; 12],
    context: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, GroupError> {
    let aad = aad(epoch, &sender, context);
    let nonce = nonce(&aad);
    let ciphertext = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| GroupError::Mls("seal".into()))?;
    let mut w = Writer::default();
    w.u8(SEALED_VERSION)
        .raw(&epoch.to_be_bytes())
        .raw(sender.as_bytes())
        .raw(&nonce)
        .raw(&ciphertext);
    Ok(w.buf)
}

/// Opens the parts of a sealed payload with `cipher` (the key of the epoch it names).
fn open_with(
    cipher: &Aes256GcmSiv,
    parts: Sealed<'_>,
    context: &[u8],
) -> Result<Opened, GroupError> {
    let Sealed {
        epoch,
        sender,
        nonce,
        ciphertext,
    } = parts;
    let plaintext = cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad(epoch, &sender, context),
            },
        )
        .map_err(|_| GroupError::Tampered)?;
    Ok(Opened {
        epoch,
        sender,
        plaintext,
    })
}

/// The epoch a sealed payload names, read without any key.
///
/// # Errors
/// [`GroupError::Malformed`] if the bytes are not a sealed payload.
pub fn sealed_epoch(sealed: &[u8]) -> Result<u64, GroupError> {
    sealed_header(sealed).map(|(epoch, _)| epoch)
}

/// The epoch and the sender a sealed payload names, read without any key (unauthenticated
/// until it opens).
///
/// # Errors
/// [`GroupError::Malformed`] if the bytes are not a sealed payload.
pub fn sealed_header(sealed: &[u8]) -> Result<(u64, NodeId), GroupError> {
    parse_sealed(sealed).map(|s| (s.epoch, s.sender))
}

/// Bytes a sealed payload has beyond its plaintext (header and authentication tag).
pub const SEALED_OVERHEAD: usize = SEALED_HEADER + 16;

/// A commit built by this member, to be ordered; the Welcome goes to the joiner once the commit
/// has been applied.
#[derive(Clone, Debug)]
pub struct Proposal {
    /// The commit (an MLS message), to submit to the ordering layer.
    pub commit: Vec<u8>,
    /// For an Add: the Welcome (an MLS message) for the new member.
    pub welcome: Option<Vec<u8>>,
}

/// What applying an ordered commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitOutcome {
    /// The group moved to this epoch.
    Advanced(u64),
    /// The commit removed this member: it holds no key of the new epoch.
    Removed,
}

/// The digest of an ordered commit (a domain-separated BLAKE3 hash): how the ordering layer's
/// replicated state and the members name it in acknowledgements and refusals.
pub fn commit_digest(commit: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new_derive_key(COMMIT_DIGEST_CONTEXT)
        .update(commit)
        .finalize()
        .as_bytes()
}

/// What [`GroupMember::settle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// The commit stays: the member forgot the state from before it.
    Kept,
    /// The commit was voided: the member is back in the state from before it.
    RolledBack,
    /// The member holds no unsettled commit with that digest.
    Unknown,
}

/// A member's state before an unsettled commit (see the module doc).
struct Undo {
    /// The epoch the commit was made for (the member's epoch before it; `None`: no group).
    made_for: Option<u64>,
    digest: [u8; 32],
    values: HashMap<Vec<u8>, Vec<u8>>,
    group_id: Option<GroupId>,
    keys: KeyRingSnapshot,
    entered_by: [u8; 32],
    epoch_started: Duration,
}

impl Drop for Undo {
    fn drop(&mut self) {
        // The storage copy holds the epoch's MLS secrets.
        for v in self.values.values_mut() {
            v.zeroize();
        }
    }
}

/// Checks a staged commit from `committer` against the commit policy for the ordered
/// membership `m` (see the module doc), before it is merged into `group`.
fn check_commit(
    group: &MlsGroup,
    committer: &openmls::prelude::Credential,
    staged: &openmls::prelude::StagedCommit,
    policy: &CommitPolicy<'_>,
) -> Result<(), GroupError> {
    let m = policy.membership;
    let refuse = |why: String| Err(GroupError::CommitRefused(why));
    let replicas: BTreeSet<NodeId> = m.replica_ids().into_iter().collect();
    let key_of = |id: &NodeId| {
        m.members()
            .get(id)
            .and_then(|member| ed25519_public_key(&member.certificate))
    };
    let Some(sender) = member_id(committer).filter(|id| replicas.contains(id)) else {
        return refuse("the committer is not a current replica".into());
    };
    let mut added = BTreeSet::new();
    let mut removed = BTreeSet::new();
    for queued in staged.queued_proposals() {
        match queued.proposal() {
            MlsProposal::Add(add) => {
                let leaf = add.key_package().leaf_node();
                let Some(id) = member_id(leaf.credential()).filter(|id| replicas.contains(id))
                else {
                    return refuse("adds a node that is not a current replica".into());
                };
                if key_of(&id).is_none_or(|k| k.as_slice() != leaf.signature_key().as_slice()) {
                    return refuse(format!(
                        "adds {id} with a key that is not its certificate's"
                    ));
                }
                let ordered = add
                    .key_package()
                    .tls_serialize_detached()
                    .map(|bytes| key_package_digest(&bytes))
                    .ok();
                if ordered.is_none() || policy.joining.get(&id) != ordered.as_ref() {
                    return refuse(format!(
                        "adds {id} with a key package it did not ask to be added with"
                    ));
                }
                if !added.insert(id) {
                    return refuse(format!("adds {id} twice"));
                }
            }
            MlsProposal::Remove(remove) => {
                let Some(id) = group
                    .member_at(remove.removed())
                    .and_then(|member| member_id(&member.credential))
                else {
                    return refuse("removes an unknown leaf".into());
                };
                removed.insert(id);
            }
            other => {
                return refuse(format!(
                    "a {:?} proposal, which this group does not use",
                    other.proposal_type()
                ));
            }
        }
    }
    let current: BTreeSet<NodeId> = group
        .members()
        .filter_map(|member| member_id(&member.credential))
        .collect();
    if let Some(id) = added
        .iter()
        .find(|id| current.contains(*id) && !removed.contains(*id))
    {
        return refuse(format!("adds {id}, which is a member already"));
    }
    if let Some(id) = removed
        .iter()
        .find(|id| replicas.contains(*id) && !added.contains(*id))
    {
        return refuse(format!("removes {id}, which is a current replica"));
    }
    if let Some(leaf) = staged.update_path_leaf_node()
        && (member_id(leaf.credential()) != Some(sender)
            || key_of(&sender).is_none_or(|k| k.as_slice() != leaf.signature_key().as_slice()))
    {
        return refuse("changes the committer's credential or key".into());
    }
    Ok(())
}

/// One member of the replicas' MLS group (see the module doc).
pub struct GroupMember {
    id: NodeId,
    provider: Provider,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    group: Option<MlsGroup>,
    keys: PayloadKeys,
    pending: Option<Vec<u8>>,
    epoch_started: Duration,
    /// The digest of the commit that made the current epoch ([`CREATION_DIGEST`] for the
    /// epoch the group was created in).
    entered_by: [u8; 32],
    undo: Option<Undo>,
    config: GroupConfig,
    faults: Faults,
}

impl std::fmt::Debug for GroupMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMember")
            .field("id", &self.id)
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl GroupMember {
    /// A member for `identity` that is not in a group yet. With `config.state_file` set and
    /// present, the member's state is restored from it (a restart).
    ///
    /// # Errors
    /// [`GroupError::BadNodeKey`] when the identity's key is not Ed25519; state errors.
    pub fn new(identity: &Identity, config: GroupConfig) -> Result<Self, GroupError> {
        let seed = identity.ed25519_seed().ok_or(GroupError::BadNodeKey)?;
        let public = identity
            .ed25519_public()
            .ok_or(GroupError::BadNodeKey)?
            .to_vec();
        let signer =
            SignatureKeyPair::from_raw(SignatureScheme::ED25519, seed.to_vec(), public.clone());
        let credential = CredentialWithKey {
            credential: BasicCredential::new(identity.id().as_bytes().to_vec()).into(),
            signature_key: public.into(),
        };
        let mut member = Self {
            id: identity.id(),
            provider: Provider::default(),
            signer,
            credential,
            group: None,
            keys: PayloadKeys::new(identity.id()),
            pending: None,
            epoch_started: Duration::ZERO,
            entered_by: CREATION_DIGEST,
            undo: None,
            config,
            faults: Faults::default(),
        };
        if member.config.keep_epochs == 0 {
            member.config.keep_epochs = 1;
        }
        if let Some(path) = member.config.state_file.clone()
            && path.exists()
        {
            member.restore(&path)?;
        }
        Ok(member)
    }

    /// This member's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The current epoch, if in a group.
    pub fn epoch(&self) -> Option<u64> {
        self.group.as_ref().map(|g| g.epoch().as_u64())
    }

    /// Node ids of the group's members, in leaf order.
    pub fn members(&self) -> Vec<NodeId> {
        self.group
            .as_ref()
            .map(|g| {
                g.members()
                    .filter_map(|m| member_id(&m.credential))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Creates the group with this member alone (the first replica does this at genesis).
    ///
    /// # Errors
    /// MLS and state errors.
    pub fn create(&mut self, now: Duration) -> Result<(), GroupError> {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(b"securesmart replicas"),
            self.credential.clone(),
        )
        .map_err(mls_err)?;
        self.group = Some(group);
        self.entered_by = CREATION_DIGEST;
        self.undo = None;
        self.entered_epoch(now)
    }

    /// A fresh key package (an MLS message) for joining, bound to this member's credential.
    ///
    /// # Errors
    /// MLS and state errors.
    pub fn key_package(&mut self) -> Result<Vec<u8>, GroupError> {
        let bundle = KeyPackage::builder()
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .map_err(mls_err)?;
        let bytes = bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(mls_err)?;
        self.persist()?;
        Ok(bytes)
    }

    /// Checks that `key_package` verifies and is bound to `certificate`: its credential names
    /// the certificate's node id and its signature key is the certificate's key.
    ///
    /// # Errors
    /// [`GroupError::InvalidMessage`] or [`GroupError::KeyPackageMismatch`].
    pub fn check_key_package(
        &self,
        key_package: &[u8],
        certificate: &CertificateDer<'_>,
    ) -> Result<KeyPackage, GroupError> {
        if key_package.len() > MAX_MLS_MESSAGE_BYTES {
            return Err(GroupError::InvalidMessage("too large".into()));
        }
        let kp = KeyPackageIn::tls_deserialize_exact(key_package)
            .map_err(|e| GroupError::InvalidMessage(e.to_string()))?
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| GroupError::InvalidMessage(format!("{e:?}")))?;
        if kp.ciphersuite() != CIPHERSUITE {
            return Err(GroupError::KeyPackageMismatch("ciphersuite".into()));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let lifetime = kp.life_time();
        if lifetime.not_before() > now.saturating_sub(KEY_PACKAGE_MARGIN_BEFORE.as_secs())
            || lifetime.not_after() < now.saturating_add(KEY_PACKAGE_MARGIN.as_secs())
        {
            return Err(GroupError::KeyPackageMismatch(
                "its lifetime does not cover half an hour before now and a day after".into(),
            ));
        }
        let expected = securesmart_transport::node_id(certificate)
            .map_err(|e| GroupError::KeyPackageMismatch(e.to_string()))?;
        let leaf = kp.leaf_node();
        if member_id(leaf.credential()) != Some(expected) {
            return Err(GroupError::KeyPackageMismatch(
                "credential names another node".into(),
            ));
        }
        let key = ed25519_public_key(certificate).ok_or_else(|| {
            GroupError::KeyPackageMismatch("certificate key is not Ed25519".into())
        })?;
        if leaf.signature_key().as_slice() != key.as_slice() {
            return Err(GroupError::KeyPackageMismatch(
                "signature key is not the certificate's".into(),
            ));
        }
        Ok(kp)
    }

    /// Builds an Add commit for the node holding `certificate`, after checking its key package.
    ///
    /// # Errors
    /// Key package, MLS and state errors.
    pub fn propose_add(
        &mut self,
        key_package: &[u8],
        certificate: &CertificateDer<'_>,
    ) -> Result<Proposal, GroupError> {
        self.propose_add_many(&[(key_package, certificate)])
    }

    /// Builds one Add commit for several nodes (e.g. the replicas of a genesis), after checking
    /// each key package against its certificate; one Welcome serves them all.
    ///
    /// # Errors
    /// Key package, MLS and state errors.
    pub fn propose_add_many(
        &mut self,
        joiners: &[(&[u8], &CertificateDer<'_>)],
    ) -> Result<Proposal, GroupError> {
        let kps = joiners
            .iter()
            .map(|(kp, cert)| self.check_key_package(kp, cert))
            .collect::<Result<Vec<_>, _>>()?;
        self.drop_pending()?;
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.group.as_mut().ok_or(GroupError::NotMember)?;
        let (commit, welcome, _) = group.add_members(provider, signer, &kps).map_err(mls_err)?;
        let commit = commit.tls_serialize_detached().map_err(mls_err)?;
        let welcome = welcome.tls_serialize_detached().map_err(mls_err)?;
        self.pending = Some(commit.clone());
        self.persist()?;
        Ok(Proposal {
            commit,
            welcome: Some(welcome),
        })
    }

    /// The leaf of member `id` in the group.
    fn leaf_of(&self, id: NodeId) -> Result<LeafNodeIndex, GroupError> {
        self.group
            .as_ref()
            .ok_or(GroupError::NotMember)?
            .members()
            .find(|m| member_id(&m.credential) == Some(id))
            .map(|m| m.index)
            .ok_or(GroupError::UnknownMember(id))
    }

    /// Builds a Remove commit for member `id`.
    ///
    /// # Errors
    /// [`GroupError::UnknownMember`], MLS and state errors.
    pub fn propose_remove(&mut self, id: NodeId) -> Result<Proposal, GroupError> {
        let index = self.leaf_of(id)?;
        self.drop_pending()?;
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.group.as_mut().ok_or(GroupError::NotMember)?;
        let (commit, _, _) = group
            .remove_members(provider, signer, &[index])
            .map_err(mls_err)?;
        let commit = commit.tls_serialize_detached().map_err(mls_err)?;
        self.pending = Some(commit.clone());
        self.persist()?;
        Ok(Proposal {
            commit,
            welcome: None,
        })
    }

    /// Builds one commit that removes member `id`'s leaf and adds it again from
    /// `key_package` (checked against `certificate`): for a member that lost its key (it
    /// missed commits, or rolled back), so that it is never removed alone while it is a
    /// replica (the commit policy refuses that).
    ///
    /// # Errors
    /// [`GroupError::UnknownMember`], key package, MLS and state errors.
    pub fn propose_readd(
        &mut self,
        id: NodeId,
        key_package: &[u8],
        certificate: &CertificateDer<'_>,
    ) -> Result<Proposal, GroupError> {
        let kp = self.check_key_package(key_package, certificate)?;
        let index = self.leaf_of(id)?;
        self.drop_pending()?;
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.group.as_mut().ok_or(GroupError::NotMember)?;
        let messages = group
            .swap_members(provider, signer, &[index], &[kp])
            .map_err(mls_err)?;
        let commit = messages.commit.tls_serialize_detached().map_err(mls_err)?;
        let welcome = messages.welcome.tls_serialize_detached().map_err(mls_err)?;
        self.pending = Some(commit.clone());
        self.persist()?;
        Ok(Proposal {
            commit,
            welcome: Some(welcome),
        })
    }

    /// Builds an Update commit (fresh leaf keys: forward secrecy and post-compromise security).
    ///
    /// # Errors
    /// MLS and state errors.
    pub fn propose_update(&mut self) -> Result<Proposal, GroupError> {
        self.drop_pending()?;
        let (provider, signer) = (&self.provider, &self.signer);
        let group = self.group.as_mut().ok_or(GroupError::NotMember)?;
        let bundle = group
            .self_update(provider, signer, LeafNodeParameters::default())
            .map_err(mls_err)?;
        let commit = bundle
            .into_commit()
            .tls_serialize_detached()
            .map_err(mls_err)?;
        self.pending = Some(commit.clone());
        self.persist()?;
        Ok(Proposal {
            commit,
            welcome: None,
        })
    }

    /// Forgets a commit of ours that was not (or not yet) ordered.
    fn drop_pending(&mut self) -> Result<(), GroupError> {
        if self.pending.take().is_some()
            && let Some(group) = self.group.as_mut()
        {
            group
                .clear_pending_commit(self.provider.storage())
                .map_err(mls_err)?;
        }
        Ok(())
    }

    /// Applies the next commit in the order the ordering layer gave (see the module doc),
    /// without the commit policy: for a group whose membership the caller checks itself.
    /// `now` is the caller's clock, used only for the rotation policy.
    ///
    /// # Errors
    /// [`GroupError::CommitRefused`] (nothing changed), malformed input, MLS and state errors.
    pub fn apply_commit(
        &mut self,
        commit: &[u8],
        now: Duration,
    ) -> Result<CommitOutcome, GroupError> {
        self.apply(commit, None, now)
    }

    /// Applies the next ordered commit after checking it against the commit policy for the
    /// ordered `membership` (see the module doc): a commit the policy refuses changes nothing,
    /// at every correct member alike. The commit stays unsettled until [`GroupMember::settle`].
    ///
    /// # Errors
    /// [`GroupError::CommitRefused`] (nothing changed), malformed input, MLS and state errors.
    pub fn apply_commit_checked(
        &mut self,
        commit: &[u8],
        policy: &CommitPolicy<'_>,
        now: Duration,
    ) -> Result<CommitOutcome, GroupError> {
        self.apply(commit, Some(policy), now)
    }

    fn apply(
        &mut self,
        commit: &[u8],
        policy: Option<&CommitPolicy<'_>>,
        now: Duration,
    ) -> Result<CommitOutcome, GroupError> {
        if commit.len() > MAX_MLS_MESSAGE_BYTES {
            return Err(GroupError::InvalidMessage("too large".into()));
        }
        if self.group.is_none() {
            return Err(GroupError::NotMember);
        }
        let digest = commit_digest(commit);
        let undo = self.undo_point(digest)?;
        if self.pending.as_deref() == Some(commit) {
            // Our own commit came back first in the order: merge it (we built it under the
            // policy).
            self.pending = None;
            let group = self.group.as_mut().ok_or(GroupError::NotMember)?;
            group
                .merge_pending_commit(&self.provider)
                .map_err(mls_err)?;
        } else {
            let message = MlsMessageIn::tls_deserialize_exact(commit)
                .map_err(|e| GroupError::InvalidMessage(e.to_string()))?
                .try_into_protocol_message()
                .map_err(|e| GroupError::InvalidMessage(format!("{e:?}")))?;
            let provider = &self.provider;
            let group = self.group.as_mut().ok_or(GroupError::NotMember)?;
            let processed = group
                .process_message(provider, message)
                .map_err(|e| GroupError::CommitRefused(format!("{e:?}")))?;
            let committer = processed.credential().clone();
            let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content()
            else {
                return Err(GroupError::CommitRefused("not a commit".into()));
            };
            if let Some(policy) = policy {
                check_commit(group, &committer, &staged, policy)?;
            }
            // This commit wins the epoch: a commit of ours for it is void. (A refused commit
            // above left ours in place: it may still come in the order.)
            if self.pending.take().is_some() {
                group
                    .clear_pending_commit(provider.storage())
                    .map_err(mls_err)?;
            }
            group
                .merge_staged_commit(provider, *staged)
                .map_err(mls_err)?;
        }
        self.undo = Some(undo);
        self.entered_by = digest;
        let active = self.group.as_ref().is_some_and(MlsGroup::is_active);
        if !active {
            // Removed: the new epoch's secrets were never ours; forget the group.
            self.group = None;
            self.keys.left()?;
            self.persist()?;
            return Ok(CommitOutcome::Removed);
        }
        self.entered_epoch(now)?;
        Ok(CommitOutcome::Advanced(self.epoch().unwrap_or_default()))
    }

    /// The state to go back to if the commit `digest`, about to be merged, is voided.
    fn undo_point(&self, digest: [u8; 32]) -> Result<Undo, GroupError> {
        let values = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| GroupError::State("storage lock".into()))?
            .clone();
        Ok(Undo {
            made_for: self.epoch(),
            digest,
            values,
            group_id: self.group.as_ref().map(|g| g.group_id().clone()),
            keys: self.keys.snapshot()?,
            entered_by: self.entered_by,
            epoch_started: self.epoch_started,
        })
    }

    /// The ordering layer settled the commit `digest`: `keep` it (the group took it), or go
    /// back to the state from before it (it was voided: some correct members could not apply
    /// it). A member without that commit unsettled changes nothing.
    ///
    /// # Errors
    /// MLS and state errors while going back.
    pub fn settle(&mut self, digest: [u8; 32], keep: bool) -> Result<Settled, GroupError> {
        if self.undo.as_ref().is_none_or(|u| u.digest != digest) {
            return Ok(Settled::Unknown);
        }
        let Some(mut undo) = self.undo.take() else {
            return Ok(Settled::Unknown);
        };
        if keep {
            return Ok(Settled::Kept);
        }
        self.pending = None;
        *self
            .provider
            .storage
            .values
            .write()
            .map_err(|_| GroupError::State("storage lock".into()))? =
            std::mem::take(&mut undo.values);
        self.group = match &undo.group_id {
            Some(id) => MlsGroup::load(self.provider.storage(), id).map_err(mls_err)?,
            None => None,
        };
        self.keys.put_back(std::mem::take(&mut undo.keys))?;
        self.entered_by = undo.entered_by;
        self.epoch_started = undo.epoch_started;
        self.persist()?;
        Ok(Settled::RolledBack)
    }

    /// The unsettled commit, if any: the epoch it was made for (`None`: this member joined
    /// with it) and its digest.
    pub fn unsettled(&self) -> Option<(Option<u64>, [u8; 32])> {
        self.undo.as_ref().map(|u| (u.made_for, u.digest))
    }

    /// The digest of the commit that made the current epoch ([`CREATION_DIGEST`] for the
    /// epoch the group was created in, and after [`GroupMember::join`]).
    pub fn entered_by(&self) -> [u8; 32] {
        self.entered_by
    }

    /// Joins the group from a Welcome (after the Add commit that produced it was ordered).
    /// Any group state this member holds is dropped first (call it only when that state is of
    /// no use: no group, or one that fell behind).
    ///
    /// # Errors
    /// Malformed input, MLS and state errors.
    pub fn join(&mut self, welcome: &[u8], now: Duration) -> Result<(), GroupError> {
        self.join_from(welcome, CREATION_DIGEST, now)
    }

    /// [`GroupMember::join`] with the digest of the commit whose Welcome it is
    /// ([`commit_digest`]): the join stays unsettled until [`GroupMember::settle`] for that
    /// commit (if it is voided, the member is back where it was: without a group, or in the
    /// one it had).
    ///
    /// # Errors
    /// Malformed input, MLS and state errors.
    pub fn join_from(
        &mut self,
        welcome: &[u8],
        commit: [u8; 32],
        now: Duration,
    ) -> Result<(), GroupError> {
        if welcome.len() > MAX_MLS_MESSAGE_BYTES {
            return Err(GroupError::InvalidMessage("too large".into()));
        }
        let MlsMessageBodyIn::Welcome(welcome) = MlsMessageIn::tls_deserialize_exact(welcome)
            .map_err(|e| GroupError::InvalidMessage(e.to_string()))?
            .extract()
        else {
            return Err(GroupError::InvalidMessage("not a Welcome".into()));
        };

        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .build();
        // A member whose group state fell behind (it missed commits and asks to be re-added)
        // drops the old state first: the new group has the same group id, and the old state
        // holds no key anybody still uses.
        // After `apply` found this member removed by the same commit, its undo point (into the
        // group it had) stays; otherwise the point is the state before the join.
        let undo = match self.undo.take() {
            Some(undo) if undo.digest == commit => undo,
            _ => {
                let mut undo = self.undo_point(commit)?;
                undo.made_for = None;
                undo
            }
        };
        if let Some(mut old) = self.group.take() {
            self.pending = None;
            old.delete(self.provider.storage()).map_err(mls_err)?;
        }
        let staged = StagedWelcome::new_from_welcome(&self.provider, &config, welcome, None)
            .map_err(|e| GroupError::InvalidMessage(format!("{e:?}")));
        let group = match staged.and_then(|s| s.into_group(&self.provider).map_err(mls_err)) {
            Ok(group) => group,
            Err(e) => {
                // The old state is gone from the storage: put it back.
                self.undo = Some(undo);
                self.settle(commit, false)?;
                return Err(e);
            }
        };
        self.group = Some(group);
        self.undo = Some(undo);
        self.entered_by = commit;
        self.entered_epoch(now)
    }

    /// Derives the new epoch's payload key, erases keys older than the window, persists.
    fn entered_epoch(&mut self, now: Duration) -> Result<(), GroupError> {
        let group = self.group.as_ref().ok_or(GroupError::NotMember)?;
        let epoch = group.epoch().as_u64();
        let exporter = Zeroizing::new(
            group
                .export_secret(self.provider.crypto(), EXPORTER_LABEL, &[], 32)
                .map_err(mls_err)?,
        );
        self.keys.entered(
            epoch,
            Zeroizing::new(blake3::derive_key(PAYLOAD_KEY_CONTEXT, &exporter)),
            self.config.keep_epochs,
        )?;
        self.epoch_started = now;
        self.persist()
    }

    /// Whether the rotation policy asks for an Update commit now.
    pub fn needs_rotation(&self, now: Duration) -> bool {
        self.group.is_some()
            && (now.saturating_sub(self.epoch_started) >= self.config.rotation.max_age
                || self.keys.sealed_in_epoch() >= self.config.rotation.max_sealed)
    }

    /// Keeps the keys of `from` and later epochs beyond `keep_epochs` (up to
    /// [`MAX_KEPT_EPOCHS`]), because data sealed in them is still needed (a journal replayed
    /// after a restart); erases, and persists, the keys of older epochs that the window no
    /// longer holds. Pins are not persisted: set the pin again after a restart.
    ///
    /// # Errors
    /// State-file errors.
    pub fn pin_keys(&mut self, from: u64) -> Result<(), GroupError> {
        if self.keys.pin(from, self.config.keep_epochs)? {
            self.persist()
        } else {
            Ok(())
        }
    }

    /// Epochs whose keys this member holds.
    pub fn key_epochs(&self) -> Vec<u64> {
        self.keys.epochs()
    }

    /// A handle on this member's payload keys, for sealing and opening elsewhere (it follows
    /// the member through epoch changes; see [`PayloadKeys`]).
    pub fn payload_keys(&self) -> PayloadKeys {
        self.keys.clone()
    }

    /// Seals `plaintext` under the current epoch's key, binding `context`.
    ///
    /// # Errors
    /// [`GroupError::NotMember`] without a group.
    pub fn seal(&mut self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, GroupError> {
        self.keys.seal(context, plaintext)
    }

    /// Opens a sealed payload with the key of the epoch it names, checking `context`.
    ///
    /// # Errors
    /// [`GroupError::Malformed`], [`GroupError::UnknownEpoch`] (e.g. a removed member and a new
    /// epoch, or an epoch older than the window), [`GroupError::Tampered`].
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Opened, GroupError> {
        self.keys.open(sealed, context)
    }

    /// Writes the state file (if configured) atomically, mode 0600.
    fn persist(&mut self) -> Result<(), GroupError> {
        let Some(path) = self.config.state_file.clone() else {
            return Ok(());
        };
        let mut w = Writer::default();
        w.u8(STATE_VERSION);
        let group_id = self
            .group
            .as_ref()
            .map(|g| g.group_id().as_slice().to_vec())
            .unwrap_or_default();
        w.bytes(&group_id);
        w.raw(&self.entered_by);
        self.keys.encode(&mut w)?;
        let values = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| GroupError::State("storage lock".into()))?;
        let mut entries: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
        entries.sort();
        w.raw(&(entries.len() as u32).to_be_bytes());
        for (k, v) in entries {
            w.bytes(k).bytes(v);
        }
        drop(values);
        let bytes = Zeroizing::new(w.buf);
        store::write_atomic(&path, &bytes, 0o600, &mut self.faults)
            .map_err(|e| GroupError::State(e.to_string()))
    }

    fn restore(&mut self, path: &Path) -> Result<(), GroupError> {
        let bytes = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| GroupError::State(format!("{}: {e}", path.display())))?,
        );
        if bytes.len() > MAX_STATE_BYTES {
            return Err(GroupError::State("state file too large".into()));
        }
        let state = |e: WireError| GroupError::State(format!("{}: {e}", path.display()));
        let mut r = Reader::new(&bytes);
        if bytes.first() == Some(&1) {
            return Err(GroupError::State(format!(
                "{}: state file format 1 (before settled commits) is no longer read; \
                 remove it and the replica asks to be added to the group again",
                path.display()
            )));
        }
        r.version(STATE_VERSION).map_err(state)?;
        let group_id = r.bytes("group id", 1024).map_err(state)?.to_vec();
        let entered_by = r.array::<32>().map_err(state)?;
        let n_keys = r.u32().map_err(state)?;
        let mut keys = BTreeMap::new();
        for _ in 0..n_keys.min(1024) {
            let epoch = u64::from_be_bytes(r.array().map_err(state)?);
            keys.insert(epoch, Zeroizing::new(r.array::<32>().map_err(state)?));
        }
        let n = r.u32().map_err(state)?;
        let mut values = HashMap::new();
        for _ in 0..n {
            let k = r.bytes("key", MAX_STATE_BYTES).map_err(state)?.to_vec();
            let v = r.bytes("value", MAX_STATE_BYTES).map_err(state)?.to_vec();
            values.insert(k, v);
        }
        r.finish().map_err(state)?;
        self.provider.storage = MemoryStorage {
            values: RwLock::new(values),
        };
        self.group = if group_id.is_empty() {
            None
        } else {
            MlsGroup::load(self.provider.storage(), &GroupId::from_slice(&group_id))
                .map_err(mls_err)?
        };
        self.entered_by = entered_by;
        self.keys.restored(keys, self.epoch())
    }
}

/// The epoch an ordered commit (an MLS message) was made for, read from its framing without
/// any group state, so that the ordering layer's replicated state can accept exactly the first
/// commit of each epoch (and the Welcome that comes with it) at every replica alike.
///
/// # Errors
/// [`GroupError::InvalidMessage`] if the bytes are not an MLS protocol message.
pub fn commit_epoch(commit: &[u8]) -> Result<u64, GroupError> {
    if commit.len() > MAX_MLS_MESSAGE_BYTES {
        return Err(GroupError::InvalidMessage("too large".into()));
    }
    let message = MlsMessageIn::tls_deserialize_exact(commit)
        .map_err(|e| GroupError::InvalidMessage(e.to_string()))?
        .try_into_protocol_message()
        .map_err(|e| GroupError::InvalidMessage(format!("{e:?}")))?;
    Ok(message.epoch().as_u64())
}

/// The node id a credential names, if it is one of ours.
fn member_id(credential: &openmls::prelude::Credential) -> Option<NodeId> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let bytes: [u8; 32] = basic.identity().try_into().ok()?;
    Some(NodeId::from_bytes(bytes))
}

fn aad(epoch: u64, sender: &NodeId, context: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.raw(SEALED_AAD_TAG)
        .raw(&epoch.to_be_bytes())
        .raw(sender.as_bytes())
        .bytes(context);
    w.buf
}

/// The parts of a sealed payload.
struct Sealed<'a> {
    epoch: u64,
    sender: NodeId,
    nonce: [u8; 12],
    ciphertext: &'a [u8],
}

/// Splits a sealed payload into its parts (the ciphertext holds at least a tag).
fn parse_sealed(sealed: &[u8]) -> Result<Sealed<'_>, GroupError> {
    if sealed.len() < SEALED_HEADER + 16 {
        return Err(GroupError::Malformed);
    }
    let mut r = Reader::new(sealed);
    let malformed = |_| GroupError::Malformed;
    r.version(SEALED_VERSION).map_err(malformed)?;
    let epoch = u64::from_be_bytes(r.array().map_err(malformed)?);
    let sender = NodeId::from_bytes(r.array().map_err(malformed)?);
    let nonce: [u8; 12] = r.array().map_err(malformed)?;
    let ciphertext = sealed.get(SEALED_HEADER..).ok_or(GroupError::Malformed)?;
    Ok(Sealed {
        epoch,
        sender,
        nonce,
        ciphertext,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use securesmart_transport::Role;
    use securesmart_transport::pki::DevCa;

    const T0: Duration = Duration::ZERO;

    struct Node {
        identity: Identity,
        member: GroupMember,
    }

    fn node(ca: &DevCa, name: &str, config: GroupConfig) -> Node {
        let identity = ca.issue_role(name, Role::Replica).unwrap();
        let member = GroupMember::new(&identity, config).unwrap();
        Node { identity, member }
    }

    fn cert(n: &Node) -> CertificateDer<'static> {
        n.identity.chain()[0].clone()
    }

    /// The ordering layer: every node still in the group applies `commit`, in one order.
    fn order(nodes: &mut [&mut Node], commit: &[u8]) -> Vec<Result<CommitOutcome, String>> {
        nodes
            .iter_mut()
            .filter(|n| n.member.epoch().is_some())
            .map(|n| n.member.apply_commit(commit, T0).map_err(|e| e.to_string()))
            .collect()
    }

    /// A group of `n` replicas built by Adds from the first one.
    fn group(ca: &DevCa, n: usize) -> Vec<Node> {
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| node(ca, &format!("r{i}"), GroupConfig::default()))
            .collect();
        nodes[0].member.create(T0).unwrap();
        for i in 1..n {
            let kp = nodes[i].member.key_package().unwrap();
            let c = cert(&nodes[i]);
            let p = nodes[0].member.propose_add(&kp, &c).unwrap();
            let (done, rest) = nodes.split_at_mut(i);
            let mut members: Vec<&mut Node> = done.iter_mut().collect();
            assert!(order(&mut members, &p.commit).iter().all(|r| r.is_ok()));
            rest[0].member.join(&p.welcome.unwrap(), T0).unwrap();
        }
        nodes
    }

    fn all(nodes: &mut [Node]) -> Vec<&mut Node> {
        nodes.iter_mut().collect()
    }

    /// The ordered membership of `nodes`' replicas.
    fn membership(ca: &DevCa, nodes: &[&Node]) -> Membership {
        let members = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| crate::epoch::Member {
                certificate: cert(n),
                replica_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                client_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9100 + i as u16)),
                role: Role::Replica,
                key_package: vec![],
            })
            .collect();
        Membership::genesis(
            ca.certificate(),
            members,
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap()
    }

    #[test]
    fn commits_the_membership_does_not_allow_are_refused_by_every_member() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 5);
        let everyone = membership(&ca, &nodes.iter().collect::<Vec<_>>());
        let no_one = BTreeMap::new();
        let policy = |m| CommitPolicy {
            membership: m,
            joining: &no_one,
        };
        // A faulty member (4) removes two current replicas in a valid MLS commit.
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.identity.id()).collect();
        let forged = {
            let faulty = &mut nodes[4].member;
            let index = |id| {
                faulty
                    .group
                    .as_ref()
                    .unwrap()
                    .members()
                    .find(|m| member_id(&m.credential) == Some(id))
                    .unwrap()
                    .index
            };
            let (a, b) = (index(ids[1]), index(ids[2]));
            let (provider, signer) = (&faulty.provider, &faulty.signer);
            let (commit, _, _) = faulty
                .group
                .as_mut()
                .unwrap()
                .remove_members(provider, signer, &[a, b])
                .unwrap();
            commit.tls_serialize_detached().unwrap()
        };
        for n in &mut nodes[..4] {
            let r = n
                .member
                .apply_commit_checked(&forged, &policy(&everyone), T0);
            assert!(
                matches!(&r, Err(GroupError::CommitRefused(why)) if why.contains("current replica")),
                "{r:?}"
            );
            assert_eq!(n.member.epoch(), Some(4), "nothing changed");
        }
        // The same removal once replica 2 has left the membership: applied (the accepted
        // case); replica 1 still may not be removed alone.
        let without_2 = membership(&ca, &[&nodes[0], &nodes[1], &nodes[3], &nodes[4]]);
        let r = nodes[0]
            .member
            .apply_commit_checked(&forged, &policy(&without_2), T0);
        assert!(matches!(r, Err(GroupError::CommitRefused(_))), "{r:?}");
        let p = nodes[0].member.propose_remove(ids[2]).unwrap();
        for i in [1, 3] {
            let r = nodes[i]
                .member
                .apply_commit_checked(&p.commit, &policy(&without_2), T0);
            assert_eq!(r.unwrap(), CommitOutcome::Advanced(5));
        }
        // An Add of a node that is not a replica of the membership is refused.
        let outsider = node(&ca, "outsider", GroupConfig::default());
        let mut outsider = outsider;
        let kp = outsider.member.key_package().unwrap();
        let p = nodes[3].member.propose_add(&kp, &cert(&outsider)).unwrap();
        let r = nodes[1]
            .member
            .apply_commit_checked(&p.commit, &policy(&without_2), T0);
        assert!(
            matches!(r, Err(GroupError::CommitRefused(why)) if why.contains("not a current replica"))
        );
    }

    #[test]
    fn a_voided_commit_is_undone_and_a_kept_one_stays() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let everyone = membership(&ca, &nodes.iter().collect::<Vec<_>>());
        let no_one = BTreeMap::new();
        let policy = |m| CommitPolicy {
            membership: m,
            joining: &no_one,
        };
        let before = nodes[1].member.payload_keys();
        let sealed_before = nodes[1].member.seal(b"ctx", b"before").unwrap();
        // A commit that members 0 and 1 merged, then the order voids it.
        let p = nodes[2].member.propose_update().unwrap();
        for i in [0, 1] {
            let r = nodes[i]
                .member
                .apply_commit_checked(&p.commit, &policy(&everyone), T0);
            assert_eq!(r.unwrap(), CommitOutcome::Advanced(4));
        }
        let digest = commit_digest(&p.commit);
        assert_eq!(nodes[1].member.unsettled(), Some((Some(3), digest)));
        assert_eq!(
            nodes[1].member.settle(digest, false).unwrap(),
            Settled::RolledBack
        );
        assert_eq!(nodes[1].member.epoch(), Some(3));
        assert_eq!(before.current(), Some(3));
        assert!(
            !before.epochs().contains(&4),
            "the voided epoch's key is gone"
        );
        assert!(nodes[1].member.open(&sealed_before, b"ctx").is_ok());
        // Back in epoch 3, member 1 applies the commit that wins it instead, like member 2's
        // group would; and keeps it.
        nodes[0].member.settle(digest, false).unwrap();
        // The faulty committer's own pending commit is dropped when another wins.
        let q = nodes[0].member.propose_update().unwrap();
        let mut members = all(&mut nodes);
        for r in order(&mut members, &q.commit) {
            assert_eq!(r.unwrap(), CommitOutcome::Advanced(4));
        }
        let kept = commit_digest(&q.commit);
        for n in &mut nodes {
            assert_eq!(n.member.settle(kept, true).unwrap(), Settled::Kept);
            assert_eq!(n.member.unsettled(), None);
            assert_eq!(n.member.entered_by(), kept);
        }
        let sealed = nodes[2].member.seal(b"ctx", b"after").unwrap();
        assert!(nodes[1].member.open(&sealed, b"ctx").is_ok());
        assert_eq!(
            nodes[1].member.settle(kept, false).unwrap(),
            Settled::Unknown
        );
    }

    #[test]
    fn a_current_replica_is_re_added_only_with_the_key_package_it_asked_with() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let m = membership(&ca, &nodes.iter().collect::<Vec<_>>());
        let victim = nodes[1].identity.id();
        let cert1 = cert(&nodes[1]);
        // An old key package of replica 1 (in the log since it joined, say), used by a faulty
        // member to swap replica 1 out of the group while it is in sync.
        let old = nodes[1].member.key_package().unwrap();
        let swap = nodes[3].member.propose_readd(victim, &old, &cert1).unwrap();
        let no_one = BTreeMap::new();
        let in_sync = CommitPolicy {
            membership: &m,
            joining: &no_one,
        };
        let r = nodes[0]
            .member
            .apply_commit_checked(&swap.commit, &in_sync, T0);
        assert!(
            matches!(&r, Err(GroupError::CommitRefused(why)) if why.contains("did not ask")),
            "{r:?}"
        );
        // Replica 1 lost its key and ordered a fresh key package: the re-add with exactly it
        // is applied; one with the old package still is not.
        let fresh = nodes[1].member.key_package().unwrap();
        let asked = BTreeMap::from([(victim, key_package_digest(&fresh))]);
        let stale = CommitPolicy {
            membership: &m,
            joining: &asked,
        };
        let r = nodes[0]
            .member
            .apply_commit_checked(&swap.commit, &stale, T0);
        assert!(matches!(r, Err(GroupError::CommitRefused(_))), "{r:?}");
        let readd = nodes[3]
            .member
            .propose_readd(victim, &fresh, &cert1)
            .unwrap();
        let r = nodes[0]
            .member
            .apply_commit_checked(&readd.commit, &stale, T0);
        assert_eq!(r.unwrap(), CommitOutcome::Advanced(4));
    }

    #[test]
    fn four_members_derive_the_same_key() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let epochs: Vec<_> = nodes.iter().map(|n| n.member.epoch()).collect();
        assert!(epochs.iter().all(|e| *e == Some(3)), "{epochs:?}");
        assert_eq!(nodes[2].member.members().len(), 4);
        for i in 0..4 {
            let sealed = nodes[i]
                .member
                .seal(b"view 1 seq 7", b"confidential request")
                .unwrap();
            for n in &nodes {
                let opened = n.member.open(&sealed, b"view 1 seq 7").unwrap();
                assert_eq!(opened.plaintext, b"confidential request");
                assert_eq!((opened.epoch, opened.sender), (3, nodes[i].identity.id()));
            }
        }
    }

    #[test]
    fn a_removed_member_cannot_open_the_new_epoch() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 5);
        let old = nodes[4].member.seal(b"ctx", b"before").unwrap();
        let fifth = nodes[4].identity.id();
        let p = nodes[1].member.propose_remove(fifth).unwrap();
        let outcomes = order(&mut all(&mut nodes), &p.commit);
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Ok(CommitOutcome::Removed))
                .count(),
            1
        );
        assert_eq!(nodes[4].member.epoch(), None);
        let sealed = nodes[0].member.seal(b"ctx", b"after").unwrap();
        assert!(matches!(
            nodes[4].member.open(&sealed, b"ctx"),
            Err(GroupError::UnknownEpoch(5))
        ));
        for n in &nodes[..4] {
            assert_eq!(n.member.open(&sealed, b"ctx").unwrap().plaintext, b"after");
            assert_eq!(
                n.member.open(&old, b"ctx").unwrap().plaintext,
                b"before",
                "in-flight payloads of the last epochs"
            );
            assert!(!n.member.members().contains(&fifth));
        }
        assert!(matches!(
            nodes[4].member.seal(b"ctx", b"x"),
            Err(GroupError::NotMember)
        ));
    }

    #[test]
    fn what_a_client_seals_with_its_key_opens_at_every_member_and_for_no_other_client() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let alice = NodeId::from_bytes([1; 32]);
        let mallory = NodeId::from_bytes([2; 32]);
        let epoch = nodes[0].member.epoch().unwrap();
        let key = nodes[0]
            .member
            .payload_keys()
            .client_key(epoch, &alice)
            .unwrap();
        // Every member derives the same key; other clients and epochs get other keys.
        for n in &nodes[1..] {
            assert_eq!(
                n.member.payload_keys().client_key(epoch, &alice).unwrap(),
                key
            );
        }
        let keys = nodes[1].member.payload_keys();
        assert_ne!(
            keys.client_key(epoch, &mallory).unwrap().secret_bytes(),
            key.secret_bytes()
        );
        assert_ne!(
            keys.client_key(epoch, &alice).unwrap().secret_bytes(),
            &[0; 32]
        );
        assert!(!format!("{key:?}").contains(&format!("{:?}", key.secret_bytes())));
        let sealed = key.seal(b"ctx", b"operation").unwrap();
        assert_eq!(sealed_header(&sealed).unwrap(), (epoch, alice));
        for n in &nodes {
            let opened = n
                .member
                .payload_keys()
                .open_from_client(&sealed, &alice, b"ctx")
                .unwrap();
            assert_eq!(opened.plaintext, b"operation");
            assert_eq!(opened.sender, alice);
        }
        assert_eq!(key.open(&sealed, b"ctx").unwrap().plaintext, b"operation");
        // Not in another client's name, nor with another context; and a client's key is not
        // the group's: what it seals does not open as the group's own payload.
        assert!(matches!(
            keys.open_from_client(&sealed, &mallory, b"ctx"),
            Err(GroupError::Tampered)
        ));
        assert!(matches!(
            keys.open_from_client(&sealed, &alice, b"other"),
            Err(GroupError::Tampered)
        ));
        assert!(matches!(
            keys.open(&sealed, b"ctx"),
            Err(GroupError::Tampered)
        ));
        // Mallory's key, with Alice named in the header, does not open either.
        let forged = ClientSealingKey::from_bytes(
            epoch,
            alice,
            *keys.client_key(epoch, &mallory).unwrap().secret_bytes(),
        )
        .seal(b"ctx", b"in alice's name")
        .unwrap();
        assert!(matches!(
            keys.open_from_client(&forged, &alice, b"ctx"),
            Err(GroupError::Tampered)
        ));
        // After a rotation the old key still opens (the window), and the new one differs.
        let p = nodes[1].member.propose_update().unwrap();
        assert!(
            order(&mut all(&mut nodes), &p.commit)
                .iter()
                .all(|r| r.is_ok())
        );
        let next = nodes[2].member.epoch().unwrap();
        assert_ne!(next, epoch);
        assert_ne!(
            keys.client_key(next, &alice).unwrap().secret_bytes(),
            key.secret_bytes(),
            "a new epoch's key is not the old one's (not only another epoch number)"
        );
        assert_eq!(
            keys.open_from_client(&sealed, &alice, b"ctx")
                .unwrap()
                .plaintext,
            b"operation"
        );
    }

    #[test]
    fn tampered_payloads_are_refused() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let sealed = nodes[0].member.seal(b"view 2", b"secret").unwrap();
        let reader = &nodes[1].member;
        assert!(reader.open(&sealed, b"view 2").is_ok());
        assert!(
            matches!(reader.open(&sealed, b"view 3"), Err(GroupError::Tampered)),
            "context"
        );
        let flip = |at: usize| {
            let mut s = sealed.clone();
            s[at] ^= 1;
            reader.open(&s, b"view 2")
        };
        assert!(
            matches!(flip(sealed.len() - 1), Err(GroupError::Tampered)),
            "ciphertext"
        );
        assert!(
            matches!(flip(1 + 8 + 32), Err(GroupError::Tampered)),
            "nonce"
        );
        assert!(matches!(flip(1 + 8), Err(GroupError::Tampered)), "sender");
        // Epoch 3 -> 2: that key is still in the window, so the AAD check refuses it.
        assert!(
            matches!(
                flip(8),
                Err(GroupError::Tampered | GroupError::UnknownEpoch(_))
            ),
            "epoch"
        );
        assert!(
            matches!(flip(1), Err(GroupError::UnknownEpoch(_))),
            "far epoch"
        );
        assert!(matches!(flip(0), Err(GroupError::Malformed)), "version");
        assert!(matches!(
            reader.open(&sealed[..20], b"view 2"),
            Err(GroupError::Malformed)
        ));
    }

    #[test]
    fn replayed_and_losing_commits_are_refused_by_every_member() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let a = nodes[0].member.propose_update().unwrap();
        let b = nodes[1].member.propose_update().unwrap();
        // Both were made for epoch 3; the order puts a first.
        assert!(
            order(&mut all(&mut nodes), &a.commit)
                .iter()
                .all(|r| r == &Ok(CommitOutcome::Advanced(4)))
        );
        let second = order(&mut all(&mut nodes), &b.commit);
        assert_eq!(second.len(), 4);
        assert!(
            second
                .iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("commit refused"))),
            "{second:?}"
        );
        let replay = order(&mut all(&mut nodes), &a.commit);
        assert!(
            replay.iter().all(Result::is_err),
            "a replayed commit is refused"
        );
        assert!(nodes.iter().all(|n| n.member.epoch() == Some(4)));
        let sealed = nodes[1].member.seal(b"", b"still agreed").unwrap();
        assert!(nodes.iter().all(|n| n.member.open(&sealed, b"").is_ok()));
    }

    #[test]
    fn commits_from_outsiders_or_with_bad_signatures_are_refused() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 4);
        let good = nodes[2].member.propose_update().unwrap();
        let mut forged = good.commit.clone();
        let last = forged.len() - 1;
        forged[last] ^= 0x55; // inside the signature or tag
        assert!(
            order(&mut all(&mut nodes), &forged)
                .iter()
                .all(Result::is_err)
        );
        // An outsider with its own group of the same id.
        let mut outsider = node(&ca, "mallory", GroupConfig::default());
        outsider.member.create(T0).unwrap();
        let evil = outsider.member.propose_update().unwrap();
        assert!(
            order(&mut all(&mut nodes), &evil.commit)
                .iter()
                .all(Result::is_err)
        );
        assert!(
            order(&mut all(&mut nodes), &[1, 2, 3])
                .iter()
                .all(Result::is_err),
            "garbage"
        );
        assert!(nodes.iter().all(|n| n.member.epoch() == Some(3)));
        // The genuine commit, ordered after all that, still applies everywhere.
        assert!(
            order(&mut all(&mut nodes), &good.commit)
                .iter()
                .all(Result::is_ok)
        );
    }

    #[test]
    fn a_key_package_must_match_the_certificate() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 1);
        let mut c = node(&ca, "c", GroupConfig::default());
        let d = node(&ca, "d", GroupConfig::default());
        let kp = c.member.key_package().unwrap();
        assert!(matches!(
            nodes[0].member.check_key_package(&kp, &cert(&d)),
            Err(GroupError::KeyPackageMismatch(_))
        ));
        assert!(matches!(
            nodes[0].member.check_key_package(&kp[1..], &cert(&c)),
            Err(GroupError::InvalidMessage(_))
        ));
        assert!(nodes[0].member.check_key_package(&kp, &cert(&c)).is_ok());
        assert!(matches!(
            nodes[0].member.propose_add(&kp, &cert(&d)),
            Err(GroupError::KeyPackageMismatch(_))
        ));
    }

    #[test]
    fn a_restarted_member_opens_current_payloads_and_follows_commits() {
        let ca = DevCa::new("mls ca").unwrap();
        let mut nodes = group(&ca, 3);
        let dir = std::env::temp_dir().join(format!("ss-mls-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = GroupConfig {
            state_file: Some(dir.join("mls.state")),
            ..GroupConfig::default()
        };
        let mut d = node(&ca, "durable", config.clone());
        let kp = d.member.key_package().unwrap();
        let p = nodes[0].member.propose_add(&kp, &cert(&d)).unwrap();
        order(&mut all(&mut nodes), &p.commit);
        d.member.join(&p.welcome.unwrap(), T0).unwrap();
        nodes.push(d);
        let before = nodes[0]
            .member
            .seal(b"c", b"sealed before the restart")
            .unwrap();
        // Restart: a new process with the same identity and state file.
        let identity = nodes[3].identity.clone();
        nodes[3].member = GroupMember::new(&identity, config.clone()).unwrap();
        assert_eq!(nodes[3].member.epoch(), Some(3));
        assert_eq!(
            nodes[3].member.open(&before, b"c").unwrap().plaintext,
            b"sealed before the restart"
        );
        let u = nodes[1].member.propose_update().unwrap();
        assert!(
            order(&mut all(&mut nodes), &u.commit)
                .iter()
                .all(Result::is_ok)
        );
        let after = nodes[3].member.seal(b"c", b"after").unwrap();
        assert!(nodes[0].member.open(&after, b"c").is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("mls.state"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_policy_and_key_window() {
        let ca = DevCa::new("mls ca").unwrap();
        let config = GroupConfig {
            keep_epochs: 2,
            rotation: RotationPolicy {
                max_age: Duration::from_secs(60),
                max_sealed: 3,
            },
            state_file: None,
        };
        let mut a = node(&ca, "a", config);
        a.member.create(T0).unwrap();
        assert!(!a.member.needs_rotation(Duration::from_secs(59)));
        assert!(a.member.needs_rotation(Duration::from_secs(60)), "by age");
        let first = a.member.seal(b"", b"epoch 0").unwrap();
        a.member.seal(b"", b"x").unwrap();
        a.member.seal(b"", b"x").unwrap();
        assert!(a.member.needs_rotation(Duration::from_secs(1)), "by count");
        for step in 1..=2u64 {
            let u = a.member.propose_update().unwrap();
            assert_eq!(
                a.member
                    .apply_commit(&u.commit, Duration::from_secs(100))
                    .unwrap(),
                CommitOutcome::Advanced(step)
            );
        }
        assert!(!a.member.needs_rotation(Duration::from_secs(101)));
        assert_eq!(a.member.key_epochs(), vec![1, 2]);
        assert!(
            matches!(a.member.open(&first, b""), Err(GroupError::UnknownEpoch(0))),
            "erased after the window"
        );
    }

    #[test]
    fn shared_seals_are_equal_at_every_member_and_bound_to_their_context() {
        let ca = DevCa::new("mls ca").unwrap();
        let nodes = group(&ca, 3);
        let seals: Vec<Vec<u8>> = nodes
            .iter()
            .map(|n| {
                n.member
                    .payload_keys()
                    .seal_shared(2, b"checkpoint 64", b"state")
                    .unwrap()
            })
            .collect();
        assert!(seals.iter().all(|s| *s == seals[0]), "deterministic");
        assert!(!seals[0].windows(5).any(|w| w == b"state"));
        let opened = nodes[1].member.open(&seals[0], b"checkpoint 64").unwrap();
        assert_eq!(
            (opened.sender, opened.plaintext),
            (GROUP_SENDER, b"state".to_vec())
        );
        let other = nodes[0]
            .member
            .payload_keys()
            .seal_shared(2, b"checkpoint 128", b"state")
            .unwrap();
        assert_ne!(other, seals[0], "the nonce follows the context");
        assert!(matches!(
            nodes[2].member.open(&seals[0], b"checkpoint 128"),
            Err(GroupError::Tampered)
        ));
        assert!(matches!(
            nodes[0].member.payload_keys().seal_shared(9, b"", b""),
            Err(GroupError::UnknownEpoch(9))
        ));
    }

    #[test]
    fn pinned_keys_outlive_the_window_until_released() {
        let ca = DevCa::new("mls ca").unwrap();
        let dir = std::env::temp_dir().join(format!("mls-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = GroupConfig {
            keep_epochs: 2,
            state_file: Some(dir.join("mls.state")),
            ..GroupConfig::default()
        };
        let mut a = node(&ca, "a", config.clone());
        a.member.create(T0).unwrap();
        a.member.pin_keys(0).unwrap();
        let first = a.member.seal(b"", b"epoch 0").unwrap();
        for _ in 0..4 {
            let u = a.member.propose_update().unwrap();
            a.member.apply_commit(&u.commit, T0).unwrap();
        }
        assert_eq!(a.member.key_epochs(), vec![0, 1, 2, 3, 4], "pinned from 0");
        assert_eq!(a.member.open(&first, b"").unwrap().plaintext, b"epoch 0");
        a.member.pin_keys(2).unwrap();
        assert_eq!(a.member.key_epochs(), vec![2, 3, 4]);
        let restarted = GroupMember::new(&a.identity, config).unwrap();
        assert_eq!(
            restarted.key_epochs(),
            vec![2, 3, 4],
            "erased on disk as well"
        );
        a.member.pin_keys(9).unwrap();
        assert_eq!(a.member.key_epochs(), vec![3, 4], "back to the window");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
