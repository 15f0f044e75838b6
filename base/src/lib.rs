//! The foundation of SecureSMART-rs: what every layer (transport, membership, ordering engine,
//! secure service) shares, and nothing that ties it to a network stack or a TLS library.
//!
//! - [`NodeId`]: a node's identity, BLAKE3 of its certificate's public key info.
//! - [`wire`]: the binary codec for untrusted input ([`wire::Reader`], [`wire::Writer`]), the
//!   [`wire::Encode`] and [`wire::Decode`] traits, and [`wire_tags!`], which writes a tag
//!   table once for both directions.
//! - [`quorum`]: the fault threshold and quorum sizes, one rule for every layer.
//! - [`tags`]: the registry of domain-separation tags, one per signed, hashed or derived value.
//! - [`keys`]: secret-key newtypes that zeroize on drop, compare in constant time and never
//!   show their bytes in `Debug`.
//!
//! ```
//! use securesmart_base::wire::{Decode, Encode, Reader, Writer};
//! use securesmart_base::{NodeId, quorum, tags};
//!
//! let id = NodeId::from_ed25519(&[7; 32]);
//! let bytes = (id, 42u64).to_vec();
//! assert_eq!(<(NodeId, u64)>::from_slice(&bytes)?, (id, 42));
//! assert_eq!((quorum::faults(4), quorum::quorum(4)), (1, 3));
//! assert!(tags::ALL.contains(&tags::consensus::PREPARE));
//! # Ok::<(), securesmart_base::wire::WireError>(())
//! ```
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod id;
pub mod keys;
pub mod quorum;
pub mod tags;
pub mod wire;

pub use id::{NodeId, ParseNodeIdError};
