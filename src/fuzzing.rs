//! Fuzz bodies for the root package's decoders, shared by `fuzz/` and the corpus replay test.
//! Not a stable API.

// invariant: these bodies run only under the fuzzer (`fuzz/`) and the corpus-replay test,
// never in a node, so no network or file input reaches their unwrap/expect calls; those
// either build fixtures from constants (a development CA) or are the oracle itself.
// Panicking is this module's job: a failed oracle is the fuzzer's finding.
#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::unwrap_used)]

use bytes::Bytes;
use securesmart_consensus::service::StateMachine;

use crate::kv::{KvOp, KvReply, KvStore};
use crate::protocol::{ClientReply, ClientRequest, Ordered, Submission};
use crate::state::NodeState;

/// Everything a node decodes from clients, from the order and from a transferred snapshot:
/// client requests and replies, roster changes, the ordered envelope, key-value operations and replies (each
/// canonical: decoding then encoding gives the input back), and the node's replicated state
/// restored from arbitrary bytes (an error, never a panic, and a failed restore changes
/// nothing).
pub fn node_input(data: &[u8]) {
    if let Ok(r) = ClientRequest::decode(data) {
        assert_eq!(r.encode(), data, "client request encoding is canonical");
    }
    if let Ok(r) = ClientReply::decode(data) {
        assert_eq!(r.encode(), data, "client reply encoding is canonical");
    }
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(o) = Ordered::decode(&bytes) {
        assert_eq!(o.encode(), bytes, "ordered envelope encoding is canonical");
    }
    if let Ok(sub) = Submission::decode(&bytes) {
        assert_eq!(sub.encode(), bytes, "submission encoding is canonical");
    }
    // The engine's signature check on an ordered payload: a verdict, never a panic.
    let _ = crate::protocol::request_check().allows(&securesmart_consensus::message::Request {
        client: securesmart_transport::NodeId::from_bytes([1; 32]),
        number: 1,
        payload: bytes.clone(),
    });
    if let Ok(op) = KvOp::decode(data) {
        assert_eq!(op.encode(), data, "kv operation encoding is canonical");
    }
    if let Ok(r) = KvReply::decode(data) {
        assert_eq!(r.encode(), data, "kv reply encoding is canonical");
    }
    let _ = securesmart_membership::Membership::decode(data);
    // A replica's answer to a client's roster query: canonical, and checked against the
    // genesis roster without a panic.
    if let Ok(changes) = crate::roster::RosterChange::decode_list(data) {
        assert_eq!(
            crate::roster::RosterChange::encode_list(&changes),
            data,
            "roster change list encoding is canonical"
        );
        let genesis =
            crate::roster::Roster::of(0, &securesmart_membership::fuzzing::four_replicas());
        let _ = crate::roster::follow(&genesis, &changes);
    }
    let mut kv = KvStore::default();
    let before = kv.clone();
    if kv.restore(data).is_err() {
        assert_eq!(kv, before, "a failed restore changes nothing");
    }
    // The node's replicated state (membership, group epoch, key acknowledgements, joiners,
    // application), as a journal or a state transfer hands it over.
    let mut state = NodeState::new(
        securesmart_membership::fuzzing::four_replicas(),
        Vec::new(),
        KvStore::default(),
    );
    let before = state.snapshot();
    if state.restore(data).is_err() {
        assert_eq!(state.snapshot(), before, "a failed restore changes nothing");
    } else {
        assert!(state.state_known(), "a restored state is the agreed one");
    }
    // The same bytes as a checkpoint (clear or sealed) at a replica without the group key.
    let mut keyless = NodeState::new(
        securesmart_membership::fuzzing::four_replicas(),
        Vec::new(),
        KvStore::default(),
    );
    let before = keyless.snapshot();
    match keyless.open_checkpoint(64, &bytes) {
        Err(_) => assert_eq!(keyless.snapshot(), before, "a failed open changes nothing"),
        Ok(None) => assert!(!keyless.state_known(), "unopened: the state is lost"),
        Ok(Some(_)) => assert!(keyless.state_known()),
    }
}
