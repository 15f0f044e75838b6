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
//!   from fuzzed bytes passes verification, and `replica_ops` drives a replica core with
//!   sequences of validly signed, possibly Byzantine messages.
//!
//! - [`replica::Replica`] is the sans-IO PBFT core, so far the normal case (batching,
//!   pre-prepare, prepare, commit, watermarks, in-order execution) and checkpoints with log
//!   garbage collection (see its module doc).
//!
//! # Deviations from PBFT (so far)
//! - Signatures instead of MAC authenticators, so that certificates can be forwarded.
//! - Messages up to one window above the current one are held (capped) and replayed when the
//!   window moves, instead of being dropped and left to retransmission.
//! - Backups do not hold client requests yet (they will, with the view-change timers).
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
