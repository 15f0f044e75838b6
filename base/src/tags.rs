//! The registry of domain-separation tags: one per signed, hashed or derived value, so that a
//! signature or digest made for one purpose is never accepted for another. Every signer and
//! hasher takes its tag from here (the layers' own constants are these values); [`ALL`] lists
//! them, and a test checks that they are distinct.
//!
//! A tag names its layer, the date it was introduced and a version; a changed encoding gets a
//! new tag. Most are BLAKE3 `derive_key` contexts; the AEAD associated-data prefixes and the
//! MLS exporter label are used as bytes (`str::as_bytes`).

/// The ordering engine (PBFT): message digests and signatures, the journal.
pub mod consensus {
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
    /// Signed view change.
    pub const VIEW_CHANGE: &str = "securesmart 2026-11-24 consensus view-change v1";
    /// Signed new view.
    pub const NEW_VIEW: &str = "securesmart 2026-11-24 consensus new-view v1";
    /// Signed state-transfer request.
    pub const FETCH_STATE: &str = "securesmart 2026-11-24 consensus fetch-state v1";
    /// Signed state-transfer reply (a checkpoint's certificate and its snapshot's parts).
    pub const STATE: &str = "securesmart 2026-12-01 consensus state v2";
    /// Digest of a replica state snapshot (the value a checkpoint signs), over its parts'
    /// digests.
    pub const STATE_DIGEST: &str = "securesmart 2026-12-01 consensus state digest v2";
    /// Digest of one part of a state snapshot.
    pub const STATE_PART: &str = "securesmart 2026-12-01 consensus state part v1";
    /// Signed request for one part of a state snapshot.
    pub const FETCH_PART: &str = "securesmart 2026-12-01 consensus fetch-part v1";
    /// Signed reply with one part of a state snapshot.
    pub const PART: &str = "securesmart 2026-12-01 consensus part v1";
    /// Requests a replica forwards to others (signed over their batch digest).
    pub const FORWARD: &str = "securesmart 2026-11-26 consensus forward v1";
    /// Checksum of a journal frame.
    pub const JOURNAL_FRAME: &str = "securesmart 2026-11-26 consensus journal frame v1";
    /// The simulator's client signing keys (test harness only).
    pub const SIM_CLIENT_KEY: &str = "securesmart sim client key";
    /// Replica keys derived from a name, for the simulator, tests and fuzz fixtures (anyone
    /// who knows the name holds the key).
    pub const NAMED_TEST_KEY: &str = "securesmart named test key";

    /// Every tag of this layer.
    pub const ALL: &[&str] = &[
        REQUEST,
        BATCH,
        PRE_PREPARE,
        PREPARE,
        COMMIT,
        CHECKPOINT,
        VIEW_CHANGE,
        NEW_VIEW,
        FETCH_STATE,
        STATE,
        STATE_DIGEST,
        STATE_PART,
        FETCH_PART,
        PART,
        FORWARD,
        JOURNAL_FRAME,
        SIM_CLIENT_KEY,
        NAMED_TEST_KEY,
    ];
}

/// The trust center and the group key.
pub mod membership {
    /// The hash under which the trust center keeps an enrollment token.
    pub const ENROLLMENT_TOKEN: &str = "securesmart 2026-11-24 enrollment token v1";
    /// The MLS exporter label of the payload key.
    pub const PAYLOAD_EXPORTER_LABEL: &str = "securesmart payload key";
    /// The payload key, derived from the MLS exporter secret.
    pub const PAYLOAD_KEY: &str = "securesmart 2026-11-24 payload key v1";
    /// Associated data of a sealed payload (as bytes).
    pub const SEALED_PAYLOAD: &str = "securesmart sealed payload v1";
    /// The nonce of a payload sealed by several replicas alike.
    pub const SHARED_SEAL_NONCE: &str = "securesmart 2026-11-26 shared-seal nonce v1";
    /// Digest of an MLS commit, as ordered.
    pub const COMMIT_DIGEST: &str = "securesmart 2026-12-01 group commit digest v1";
    /// Digest of an MLS key package, as ordered.
    pub const KEY_PACKAGE_DIGEST: &str = "securesmart 2026-12-01 key package digest v1";
    /// The key clients seal their confidential requests with.
    pub const CLIENT_SEALING_KEY: &str = "securesmart 2026-12-02 client sealing key v1";

    /// Every tag of this layer.
    pub const ALL: &[&str] = &[
        ENROLLMENT_TOKEN,
        PAYLOAD_EXPORTER_LABEL,
        PAYLOAD_KEY,
        SEALED_PAYLOAD,
        SHARED_SEAL_NONCE,
        COMMIT_DIGEST,
        KEY_PACKAGE_DIGEST,
        CLIENT_SEALING_KEY,
    ];
}

/// The secure service: rosters, signed and confidential requests, sealed checkpoints.
pub mod service {
    /// Signed roster change.
    pub const ROSTER: &str = "securesmart 2026-12-01 roster v1";
    /// Signed client request.
    pub const REQUEST_SIGNATURE: &str = "securesmart 2026-11-26 request signature v1";
    /// Commitment to a confidential request's plaintext.
    pub const CONFIDENTIAL_COMMITMENT: &str = "securesmart 2026-11-26 confidential commitment v1";
    /// A replica's signature over what it sealed for a client.
    pub const SEALER_SIGNATURE: &str = "securesmart 2026-12-01 sealer signature v1";
    /// Associated data of a confidential request (as bytes).
    pub const CONFIDENTIAL_REQUEST: &str = "securesmart confidential request v1";
    /// Associated data of a sealed checkpoint (as bytes).
    pub const SEALED_CHECKPOINT: &str = "securesmart sealed checkpoint v1";

    /// Every tag of this layer.
    pub const ALL: &[&str] = &[
        ROSTER,
        REQUEST_SIGNATURE,
        CONFIDENTIAL_COMMITMENT,
        SEALER_SIGNATURE,
        CONFIDENTIAL_REQUEST,
        SEALED_CHECKPOINT,
    ];
}

/// The transport.
pub mod transport {
    /// The QUIC stateless-reset key, derived from the node's key.
    pub const STATELESS_RESET_KEY: &str = "securesmart 2026-11-26 quic stateless reset key v1";

    /// Every tag of this layer.
    pub const ALL: &[&str] = &[STATELESS_RESET_KEY];
}

/// Every tag of every layer.
pub const ALL: &[&str] = &concat(&[
    consensus::ALL,
    membership::ALL,
    service::ALL,
    transport::ALL,
]);

const COUNT: usize =
    consensus::ALL.len() + membership::ALL.len() + service::ALL.len() + transport::ALL.len();

// Indexing in const evaluation: out of bounds fails the build, not a run.
#[allow(clippy::indexing_slicing)]
const fn concat(lists: &[&[&'static str]; 4]) -> [&'static str; COUNT] {
    let mut out = [""; COUNT];
    let (mut i, mut l) = (0, 0);
    while l < lists.len() {
        let mut j = 0;
        while j < lists[l].len() {
            out[i] = lists[l][j];
            i += 1;
            j += 1;
        }
        l += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tag_is_registered_once_and_names_the_project() {
        let mut seen = std::collections::HashSet::new();
        for tag in ALL {
            assert!(tag.starts_with("securesmart "), "{tag}");
            assert!(seen.insert(*tag), "{tag} is registered twice");
        }
        assert_eq!(seen.len(), COUNT);
        assert!(ALL.contains(&consensus::FORWARD));
    }
}
