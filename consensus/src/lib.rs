//! The PBFT ordering engine of SecureSMART-rs: a sans-IO replica core, an async driver, a
//! deterministic Byzantine simulator, and the traits that make the engine interchangeable.
//!
//! # Contract
//! - [`replica::Replica`] is the core: a deterministic state machine that performs no I/O,
//!   reads no clock and draws no randomness (events in, outputs out; it imports neither tokio
//!   nor quinn). Its module doc is the protocol description: normal case, checkpoints, view
//!   change, state transfer, at-most-once execution, reconfiguration.
//! - [`message`]: every message is signed with the sender's Ed25519 key over a BLAKE3 digest
//!   with a per-kind context; a [`message::Verified`] is made only by [`message::KeyRing`],
//!   which checks the sender, pre-prepare digests and every signature, nested ones included
//!   (batch-verified). Decoding takes explicit [`message::Limits`] and never panics.
//! - [`service`]: [`service::StateMachine`] is what an application implements (execute,
//!   snapshot, restore); [`service::Ordering`] is what any engine offers (submit, a stream of
//!   ordered events, snapshots, reconfiguration); [`service::Executor`] runs batches with the
//!   reply cache, and [`service::serve`] connects the two. Another engine that implements
//!   `Ordering` runs the same application unchanged.
//! - [`driver`]: [`driver::Network`] is the small trait through which consensus reaches the
//!   other replicas (the transport glue in the root package implements it; this crate never
//!   names the transport's connections); [`driver::Pbft`] runs the core on tokio over it, with
//!   the timers the core asks for, and counts every dropped message by reason.
//! - [`journal`]: the records that make a replica durable, and [`journal::FileJournal`],
//!   which keeps them in a directory (write-ahead, fsync before dependent outputs).
//! - [`sim`]: the seeded simulator (network delay, reordering, loss, duplication, partitions,
//!   crashes and restarts, Byzantine replicas, Twins) with safety and liveness oracles.
//!
//! Untrusted input (anything decoded from the network) gets a typed error and is dropped and
//! counted: [`message::VerifyError`] for a bad signature, non-member or mismatched digest,
//! [`replica::Ignored`] for a wrong view, a sequence number outside the watermarks, a
//! malformed certificate, a full queue. Fuzz targets: `consensus_message` (decoding) and
//! `replica_ops` (sequences of signed, possibly Byzantine messages fed to a core).
//!
//! # Deviations from PBFT (Castro and Liskov, OSDI 1999 / TOCS 2002)
//! - Signatures instead of MAC authenticators, so that certificates can be forwarded and
//!   checked by third parties (view change, state transfer).
//! - One view-change timer per held request (as in Aardvark and BFT-SMaRt), not one that
//!   restarts whenever a batch executes: a primary that orders other requests is replaced all
//!   the same when it holds one back. A request's first timeout sends it to the primary; the
//!   second changes views.
//! - Messages up to one window above the current one, or for a later view, are held (capped)
//!   and replayed when the window moves or the view starts, instead of being dropped.
//! - The new primary's pre-prepares travel inside its new-view message; backups recompute
//!   them from the view changes and refuse a new view whose pre-prepares differ.
//! - A committed certificate (pre-prepare and 2f+1 commits) suffices to execute a slot, so
//!   state transfer can ship the batches after the checkpoint with their proof.
//! - State transfer ships the snapshot in fixed-size parts ([`transfer`]), each checked
//!   against the part digests that the checkpoint's state digest covers (a flat list of
//!   digests, not a partition tree: a replica fetches the whole snapshot, not the parts that
//!   differ from its own, except parts unchanged at the same place); snapshots are bounded
//!   by [`message::Limits::max_snapshot_bytes`], not by the transport's frame size.
//! - A view change carries whole batches in its prepared certificates (no separate fetch of
//!   batches by digest), so it is as large as the prepared batches above the checkpoint.
//! - Reconfiguration: a group change executed at `s` applies above `s + window` (rounded up to
//!   a checkpoint); view changes use the group after the replica's low watermark, so a view
//!   change that straddles a group change may need a second one.
//! - Durability is the driver's job through a [`journal::Journal`]: with
//!   [`replica::Config::durable`] the core emits the records a restarted replica needs
//!   (accepted pre-prepares, prepared and committed certificates, views, stable checkpoints)
//!   before the messages that depend on them, and [`replica::Replica::recover`] rebuilds it.
//!   Without a journal a restarted replica has forgotten its votes and counts as one of the f
//!   faulty ones (the simulator counts it so).
//!
//! ```
//! use securesmart_consensus::message::{Digest, KeyRing, Message, Signer};
//! use securesmart_consensus::replica::{Config, Replica};
//! use securesmart_consensus::service::{Executor, StateMachine};
//! use securesmart_consensus::sim::{Chain, Scenario, Sim};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A replica signs with its certificate's Ed25519 key (here a seed of our own); its id is
//! // that key's node id. Signed messages verify only through a key ring of members.
//! let signer = Signer::from_seed(&[7; 32]);
//! let id = signer.id();
//! let ring = KeyRing::new([(id, signer.public_key().ok_or("no key")?)]);
//! let signed = signer.sign(Message::Prepare { view: 0, seq: 1, digest: Digest([7; 32]) });
//! assert_eq!(ring.verify(signed)?.sender(), id);
//!
//! // A core is created from the group's configuration and this replica's signer.
//! let replica = Replica::new(Config::new(vec![id]), signer);
//! assert_eq!(replica.executed(), 0);
//!
//! // Four replicas, one of them an equivocating primary, over a simulated network.
//! let mut scenario = Scenario::new(42, 4);
//! scenario.faults.push((0, securesmart_consensus::sim::Fault::Equivocate));
//! Sim::new(scenario)?.run().check()?;
//! # let _ = Executor::new(Chain::default()).app().snapshot();
//! # Ok(()) }
//! ```

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod driver;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod hold;
pub mod journal;
pub mod message;
pub mod replica;
pub mod service;
pub mod sim;
pub mod transfer;
pub mod view_change;
