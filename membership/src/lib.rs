//! Trust center (RA/CA with CSR enrollment and revocation lists), network enrollment, and
//! membership epochs; the MLS group key is to come.
//!
//! - [`TrustCenter`] (module [`trust_center`]): the RA/CA over a durable directory.
//! - [`EnrollmentServer`] and [`enroll`] (module [`enrollment`]): the same over QUIC, for nodes
//!   never configured by hand.
//! - [`Membership`] and [`MembershipCommand`] (module [`epoch`]): the agreed member set and the
//!   ordered commands that change it, applied deterministically at every replica.
//!
//! The [`TrustCenter`] is a registration and certification authority with durable, crash-safe
//! state in one directory. It signs a node's CSR only under a one-time enrollment token bound to
//! a role and to the names the node may claim, issues certificates in the profile the transport
//! checks (`securesmart_transport::pki::node_params`), revokes by serial or node id and publishes
//! CRLs. Everything it writes is ordinary PEM/DER that `openssl` and stock rustls accept. It
//! never logs secrets: tokens are shown once and stored as domain-separated hashes, and the CA
//! key file has mode 0600.
//!
//! ```
//! use std::time::Duration;
//! use securesmart_membership::{key_and_csr, RoleName, TrustCenter};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("ca-doc-{}", std::process::id()));
//! let mut ca = TrustCenter::init(&dir, "example CA")?;
//! let token = ca.create_token(RoleName::Replica, &["replica1".into()], Duration::from_secs(3600))?;
//! let (_key_pem, csr_pem) = key_and_csr(&["replica1".into()])?;
//! let csr = rustls::pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())?;
//! let issued = ca.sign_csr(&csr, &token)?;
//! assert_eq!(issued.record.names, vec!["replica1".to_string()]);
//! assert!(ca.sign_csr(&csr, &token).is_err(), "a token works once");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(()) }
//! ```

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod enrollment;
pub mod epoch;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
mod store;
pub mod trust_center;

pub use enrollment::{EnrollError, Enrolled, EnrollmentServer, enroll};
pub use epoch::{
    Applied, CommandKind, CommandRefusal, MIN_REPLICAS, Member, Membership, MembershipCommand,
};
pub use group::{
    CLIENT_KEY_CONTEXT, COMMIT_DIGEST_CONTEXT, CREATION_DIGEST, ClientSealingKey, CommitOutcome,
    CommitPolicy, GroupConfig, GroupError, GroupMember, KEY_PACKAGE_DIGEST_CONTEXT,
    KEY_PACKAGE_MARGIN, KEY_PACKAGE_MARGIN_BEFORE, MAX_MLS_MESSAGE_BYTES, Opened, PayloadKeys,
    Proposal, RotationPolicy, SEALED_OVERHEAD, Settled, commit_digest, commit_epoch,
    key_package_digest, sealed_epoch, sealed_header,
};
pub use securesmart_base::wire::WireError;
pub use trust_center::{
    EnrollmentRefusal, Issued, IssuedRecord, Reason, RevokeTarget, RoleName, TrustCenter,
    TrustCenterError, check_csr, key_and_csr,
};
