//! Fuzz bodies shared by the `fuzz/` targets and the corpus-replay test. Not a stable API.

// Panicking is this module's job: a failed oracle is the fuzzer's finding.
#![allow(clippy::expect_used)]

use crate::message::{KeyRing, Limits, Signed};

thread_local! {
    /// A key ring with one replica (whose key the fuzzer does not have).
    static RING: KeyRing = {
        let ca = securesmart_transport::pki::DevCa::new("fuzz CA").expect("CA");
        let node = ca.issue_role("r0", securesmart_transport::Role::Replica).expect("node");
        KeyRing::new([(node.id(), node.ed25519_public().expect("Ed25519"))])
    };
}

/// Decodes a consensus message: decoding is canonical (re-encoding gives the same bytes), and no
/// decoded message verifies (the fuzzer cannot sign), alone or in a batch.
pub fn consensus_message(data: &[u8]) {
    let Ok(signed) = Signed::decode(data, &Limits::default()) else {
        return;
    };
    assert_eq!(signed.encode(), data, "encoding is canonical");
    RING.with(|ring| {
        assert!(ring.verify(signed.clone()).is_err());
        assert!(ring.verify_batch(vec![signed]).iter().all(Result::is_err));
    });
}
