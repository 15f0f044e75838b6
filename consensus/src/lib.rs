//! The PBFT ordering engine (in progress): so far the consensus messages, their canonical
//! encoding, and their domain-separated Ed25519 signatures with single and batch verification.
//!
//! # Contract so far
//! - [`message::Signed`] is what travels; [`message::KeyRing`] turns it into a
//!   [`message::Verified`] only if the sender is a member, the signature verifies (strict
//!   Ed25519 over a BLAKE3 digest with a per-kind context) and a pre-prepare's batch matches its
//!   digest. The engine will take `Verified` messages only.
//! - Decoding takes explicit [`message::Limits`] and never panics on untrusted input; the
//!   `consensus_message` fuzz target checks that decoding is canonical and that nothing decoded
//!   from fuzzed bytes passes verification.
//!
//! - [`replica::Replica`] is the sans-IO PBFT core, so far the normal case: batching,
//!   pre-prepare, prepare, commit, watermarks and in-order execution (see its module doc).
//!
//! Still to come: checkpoints and garbage collection, view change, state transfer, request
//! deduplication and reply cache, the `Ordering`, `StateMachine` and network traits, the async
//! driver, and the Byzantine simulator.
//!
//! ```
//! use securesmart_consensus::message::{KeyRing, Message, Signer, Digest};
//! use securesmart_transport::{pki::DevCa, Role};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = DevCa::new("doc CA")?;
//! let node = ca.issue_role("r0", Role::Replica)?;
//! let signer = Signer::new(&node).ok_or("not Ed25519")?;
//! let ring = KeyRing::new([(node.id(), node.ed25519_public().ok_or("no key")?)]);
//! let signed = signer.sign(Message::Prepare { view: 0, seq: 1, digest: Digest([7; 32]) });
//! let verified = ring.verify(signed)?;
//! assert_eq!(verified.sender(), node.id());
//! # Ok(()) }
//! ```

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod replica;
