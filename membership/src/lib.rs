//! Trust center (RA/CA, CSR enrollment, CRLs), membership epochs and the MLS group key.
//!
//! Not built yet: this crate is the home of the trust-center and group-key issues. Until then,
//! `securesmart_transport::pki::DevCa` issues certificates in the same profile for tests and the
//! demo.
//!
//! ```
//! // Nothing to call yet; the crate exists so the workspace layout is stable.
//! ```
