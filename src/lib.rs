//! SecureSMART-rs: a security architecture for Byzantine-fault-tolerant replication.
//!
//! This facade re-exports the layers; the `securesmart` binary (CLI) lives beside it.
//! - [`base`]: node ids, the wire codec, the quorum rule, domain-separation tags, secret keys.
//! - [`transport`]: authenticated QUIC channels, rate limits, address validation, blocklists.
//! - [`membership`]: trust center, membership epochs, MLS group key.
//! - [`consensus`]: the PBFT ordering engine, its traits, driver and simulator.
//! - [`replica_network`]: the consensus network trait over the transport's replica plane.
//!
//! ```
//! use securesmart::transport::{Class, NodeId};
//! let id = NodeId::from_spki(b"a key");
//! assert_eq!(Class::from_tag(Class::Bulk.tag()), Ok(Class::Bulk));
//! assert_eq!(id.to_hex().len(), 64);
//! ```

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub use securesmart_base as base;
pub use securesmart_consensus as consensus;
pub use securesmart_membership as membership;
pub use securesmart_transport as transport;

pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
#[cfg(feature = "fault-injection")]
mod fault;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod group_key;
pub mod kv;
pub mod node;
pub mod protocol;
pub mod replica_network;
pub mod roster;
pub mod state;
