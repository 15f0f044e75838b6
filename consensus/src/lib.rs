//! PBFT ordering engine with a sans-IO core, a deterministic simulator, and the `Ordering` and
//! `StateMachine` traits.
//!
//! Not built yet: this crate is the home of the consensus issue.
//!
//! ```
//! // Nothing to call yet; the crate exists so the workspace layout is stable.
//! ```
